"""smrd.gateway.calls.Call: the future-like object a client connection waits on for its reply.

Its done-callbacks run at once when it completes (not scheduled, as a Future's are), each once,
and one that raises does not keep the others from running; awaiting goes through a real Future
made on demand, before or after the completion."""
import asyncio
import logging

import pytest

from smrd.gateway.calls import Call as _Call, ClusterUnavailable


def test_callbacks_run_at_once_in_order_and_only_once():
    call = _Call((1, 1), b"PUT a 1", now=0.0)
    seen = []
    call.add_done_callback(lambda c: seen.append(("first", c.result())))
    call.add_done_callback(lambda c: seen.append(("second", c.done())))
    assert not call.done() and seen == []
    call._complete(b"OK", None)
    assert seen == [("first", b"OK"), ("second", True)]  # no loop turn needed
    call._complete(b"other", None)                        # a late second completion: ignored
    assert call.result() == b"OK" and len(seen) == 2
    assert not call.cancelled() and call.exception() is None


def test_an_error_is_raised_by_result_and_a_failing_callback_does_not_stop_the_others(caplog):
    call = _Call((1, 2), b"GET a", now=0.0)
    seen = []

    def broken(_):
        raise RuntimeError("a connection's bug")

    call.add_done_callback(broken)
    call.add_done_callback(lambda c: seen.append(type(c.exception())))
    with caplog.at_level(logging.ERROR, logger="smrd.gateway.calls"):
        call._complete(None, ClusterUnavailable("no reply"))
    assert seen == [ClusterUnavailable]
    assert "a reply callback failed" in caplog.text
    with pytest.raises(ClusterUnavailable):
        call.result()


def test_awaiting_before_and_after_completion():
    async def main():
        loop = asyncio.get_running_loop()
        early = _Call((1, 3), b"SIZE", now=0.0)
        waiter = early.future(loop)
        assert early.future(loop) is waiter  # one Future per call, shared by its awaiters
        loop.call_soon(early._complete, b"3", None)
        assert await waiter == b"3"

        late = _Call((1, 4), b"SIZE", now=0.0)
        late._complete(None, ClusterUnavailable("deadline"))
        with pytest.raises(ClusterUnavailable):
            await late.future(loop)

        # A callback added after completion is scheduled, as a Future would do it.
        seen = []
        late.add_done_callback(seen.append)
        assert seen == []
        await asyncio.sleep(0)
        assert seen == [late]

    asyncio.run(main())
