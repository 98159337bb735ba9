"""The request window the SGLang and OpenAI-compatible backends share across callers."""

import asyncio
import threading

from models.caption.window import RequestWindow


def test_callers_on_several_threads_share_one_bound():
    window = RequestWindow(2, "test-window")
    inside, most = [0], [0]

    async def request():
        async with window.slot():
            inside[0] += 1  # only ever touched on the window's loop
            most[0] = max(most[0], inside[0])
            await asyncio.sleep(0.02)
            inside[0] -= 1
        return threading.current_thread().name

    async def batch(n):
        return await asyncio.gather(*(request() for _ in range(n)))

    results = []
    callers = [threading.Thread(target=lambda: results.append(window.run(batch(4)))) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    window.close()
    assert most[0] == 2  # three callers, four requests each: never more than the window
    assert sorted(len(r) for r in results) == [4, 4, 4]
    assert {name for r in results for name in r} == {"test-window"}  # all on the one loop
