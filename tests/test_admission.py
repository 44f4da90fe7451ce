"""Per-model admission (`modelhost.admission`): slots, the bounded queue, first come first
served, and no slot lost to a cancelled waiter."""

from __future__ import annotations

import asyncio

import pytest

from modelhost.admission import Admission
from modelhost.errors import Overloaded


def test_slots_queue_in_order_and_429_when_the_queue_is_full() -> None:
    async def main() -> None:
        admission = Admission("m", limit=2, max_queue=2)
        assert admission.try_acquire() and admission.try_acquire()
        assert not admission.try_acquire()
        order: list[int] = []

        async def queued(i: int) -> None:
            await admission.acquire()
            order.append(i)

        waiters = [asyncio.create_task(queued(i)) for i in range(2)]
        await asyncio.sleep(0)
        assert (admission.active, admission.waiting) == (2, 2)
        with pytest.raises(Overloaded) as refused:
            await admission.acquire()
        assert refused.value.status == 429
        admission.release()
        await asyncio.sleep(0)
        # The freed slot went to the first in the queue; a newcomer cannot overtake the second.
        assert order == [0] and not admission.try_acquire()
        admission.release()
        await asyncio.gather(*waiters)
        assert order == [0, 1] and (admission.active, admission.waiting) == (2, 0)
        admission.release()
        admission.release()
        assert admission.active == 0 and admission.try_acquire()

    asyncio.run(main())


def test_a_cancelled_waiter_gives_back_its_place_and_any_slot_it_was_handed() -> None:
    async def main() -> None:
        admission = Admission("m", limit=1, max_queue=4)
        await admission.acquire()
        first = asyncio.create_task(admission.acquire())
        second = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        first.cancel()  # leaves the queue
        await asyncio.sleep(0)
        assert admission.waiting == 1
        admission.release()  # handed to `second`...
        second.cancel()  # ...which is cancelled before it runs: the slot comes back
        await asyncio.gather(first, second, return_exceptions=True)
        assert (admission.active, admission.waiting) == (0, 0)
        assert admission.try_acquire()

    asyncio.run(main())
