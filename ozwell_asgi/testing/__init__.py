"""What a host needs to test its own adapters against ours: the contract suites (:mod:`.contracts`); and to test
code that calls OpenAI: a scripted backend (:mod:`.scripted`), the SDK wired in-process and a loopback server
(:mod:`.clients`, imported on its own: it needs openai), the pytest plugin's fixtures (:mod:`.plugin`).

Importing it needs pytest (the ``testing`` extra: ``pip install ozwell-asgi[testing]``).
"""

from .contracts import FileStoreContract, KeyStoreContract, ResponseStoreContract
from .scripted import Gate, ScriptedBackend

__all__ = ["FileStoreContract", "Gate", "KeyStoreContract", "ResponseStoreContract", "ScriptedBackend"]
