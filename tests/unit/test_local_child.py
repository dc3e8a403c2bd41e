"""smrd.local.Child: the process harness behind `smrd local` and the e2e tests stops a process
with one SIGTERM. A second one tells an smrd process to give up its drain and exit at once
(and once its event loop is closed, Python prints an ignored-exception traceback for it)."""
import sys

from smrd.local import Child

# Says how many SIGTERMs it got, taking its time to "drain" after the first.
COUNTING = ("import signal, sys, time\n"
            "got = []\n"
            "signal.signal(signal.SIGTERM, lambda *_: got.append(1))\n"
            "print('up', flush=True)\n"
            "while not got: time.sleep(0.01)\n"
            "time.sleep(0.3)\n"
            "print('sigterms', len(got), flush=True)\n")


def test_stop_after_terminate_sends_one_sigterm(tmp_path):
    child = Child("counter", [sys.executable, "-c", COUNTING], tmp_path / "counter.log").start()
    child.wait_for("up", 10)
    child.terminate()        # as LocalCluster.stop does for a whole tier...
    assert child.stop(10) == 0  # ... before waiting for each process of it
    assert child.wait_for("sigterms", 5).split() == ["sigterms", "1"]


def test_a_restarted_child_can_be_terminated_again(tmp_path):
    child = Child("counter", [sys.executable, "-c", COUNTING], tmp_path / "counter.log")
    for _ in range(2):
        child.start().wait_for("up", 10)
        assert child.stop(10) == 0
        assert child.wait_for("sigterms", 5).split() == ["sigterms", "1"]
