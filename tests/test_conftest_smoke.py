import pytest


@pytest.mark.anyio
async def test_postgres_database_is_private(postgres_url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        assert await conn.fetchval("select current_database()") == postgres_url.rsplit("/", 1)[1]
    finally:
        await conn.close()
