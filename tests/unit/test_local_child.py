"""smrd.ops.local.Child: the process harness behind `smrd local` and the e2e tests stops a process
with one SIGTERM. A second one tells an smrd process to give up its drain and exit at once
(and once its event loop is closed, Python prints an ignored-exception traceback for it)."""
import sys

from smrd.ops.local import Child

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


UP = "import sys, time\nprint('up', sys.argv[1], flush=True)\ntime.sleep(60)\n"


def test_on_exit_reports_each_exit_and_wait_for_follows_a_restart(tmp_path):
    # What LocalCluster's supervision builds on: the output thread reports the exit, and a
    # supervised child's wait_for does not fail on a process that is to be started again.
    import threading
    exits = []
    restarted, second_exit = threading.Event(), threading.Event()
    child = Child("sleeper", [sys.executable, "-c", UP, "1"], tmp_path / "s.log")

    def on_exit(c, proc):
        exits.append(proc.returncode)
        if len(exits) == 2:
            second_exit.set()
        if c.wanted and not restarted.is_set():
            c.argv = [sys.executable, "-c", UP, "2"]
            restarted.set()
            c.start()

    child.on_exit = on_exit
    child.start().wait_for("up 1", 10)
    child.kill()
    assert child.wait_for("up 2", 10) == "up 2"  # across the restart, not "exited before saying"
    assert exits == [-9]
    assert child.stop(10) is not None
    assert second_exit.wait(10) and not child.wanted  # stopped on purpose: no restart
    assert len(exits) == 2
