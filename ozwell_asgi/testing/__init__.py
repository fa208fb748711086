"""What a host needs to test its own adapters against ours: the contract suites (:mod:`.contracts`).

Importing it needs pytest (the ``testing`` extra: ``pip install ozwell-asgi[testing]``).
"""

from .contracts import FileStoreContract, KeyStoreContract, ResponseStoreContract

__all__ = ["FileStoreContract", "KeyStoreContract", "ResponseStoreContract"]
