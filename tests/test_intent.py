"""use_primary / use_replica / changes_database as context managers and decorators."""

from __future__ import annotations

import asyncio

from replicated_core import Intent, changes_database, use_primary, use_replica
from replicated_core.intent import current_override, forces_primary


def intent():
    override = current_override()
    return None if override is None else override.intent


def test_blocks_nest_and_restore():
    assert intent() is None
    with use_primary():
        assert intent() is Intent.PRIMARY
        with use_replica():
            assert intent() is Intent.REPLICA
            with use_primary():
                assert intent() is Intent.PRIMARY
            assert intent() is Intent.REPLICA
        assert intent() is Intent.PRIMARY
    assert intent() is None


def test_one_block_object_can_be_reentered():
    block = use_replica()
    with block:
        with block:
            assert intent() is Intent.REPLICA
        assert intent() is Intent.REPLICA
    assert intent() is None


def test_a_block_restores_after_an_exception():
    try:
        with use_primary():
            raise KeyError("boom")
    except KeyError:
        pass
    assert intent() is None


def test_decorators_on_sync_functions():
    @use_replica()
    def read():
        return intent()

    @changes_database
    def write():
        return intent()

    assert (read(), write(), intent()) == (Intent.REPLICA, Intent.PRIMARY, None)
    assert forces_primary(write) is True
    assert forces_primary(read) is False
    assert write.__name__ == "write"


async def test_decorators_on_async_functions_hold_across_awaits():
    """A contextmanager-based decorator would return before the coroutine runs."""

    @changes_database
    async def write():
        await asyncio.sleep(0)
        return intent()

    @use_replica()
    async def read():
        await asyncio.sleep(0)
        return intent()

    assert asyncio.iscoroutinefunction(write)
    assert (await write(), await read(), intent()) == (Intent.PRIMARY, Intent.REPLICA, None)
    assert forces_primary(write) is True


async def test_concurrent_tasks_do_not_see_each_others_intent():
    shared_primary = use_primary()

    @shared_primary
    async def primary_task(seen):
        for _ in range(20):
            await asyncio.sleep(0)
            seen.append(intent())

    async def plain_task(seen):
        for _ in range(20):
            await asyncio.sleep(0)
            seen.append(intent())

    a, b, c = [], [], []
    await asyncio.gather(primary_task(a), plain_task(b), primary_task(c))
    assert set(a) == {Intent.PRIMARY}
    assert set(b) == {None}
    assert set(c) == {Intent.PRIMARY}
    assert intent() is None


async def test_one_block_object_shared_by_concurrent_tasks():
    shared = use_replica()

    async def task(seen):
        for _ in range(10):
            with shared:
                await asyncio.sleep(0)
                seen.append(intent())
            seen.append(intent())

    a, b = [], []
    await asyncio.gather(task(a), task(b))
    assert a == b == [Intent.REPLICA, None] * 10


def test_one_block_object_shared_by_threads():
    import threading

    shared, barrier, seen, errors = use_primary(), threading.Barrier(4), [], []

    def worker():
        try:
            for _ in range(50):
                with shared:
                    barrier.wait(timeout=5)
                    seen.append(intent())
                seen.append(intent())
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert seen.count(Intent.PRIMARY) == seen.count(None) == 200


def test_generators_cannot_be_decorated():
    import pytest

    def rows():
        yield 1

    async def stream():
        yield 1

    with pytest.raises(TypeError) as caught:
        use_replica()(rows)
    assert str(caught.value) == (
        "'@use_replica()' cannot decorate the generator "
        "'test_generators_cannot_be_decorated.<locals>.rows': the intent would not hold "
        "while it runs. Use a 'with use_replica():' block inside it instead."
    )
    with pytest.raises(TypeError, match=r"^'@changes_database' cannot decorate the generator"):
        changes_database(stream)
