# Starts a command as its child and never reaps it: once the child is killed, it stays a zombie
# for as long as this process lives, as an app's process does while a slow PID 1 has not reaped
# it yet (seen on these machines: about 2 s). Prints "child <pid>", then the child's own output.
# SIGTERM (the test harness stopping it) kills the child and exits.
#   python unreaped_parent.py COMMAND [ARG...]
import os
import signal
import sys

pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
print(f"child {pid}", flush=True)


def stop(*_):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os._exit(0)


signal.signal(signal.SIGTERM, stop)
while True:
    signal.pause()
