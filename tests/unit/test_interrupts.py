"""SIGTERM and SIGHUP raise like Ctrl-C inside ``as_interrupts``; ``deferred`` holds them."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)


def test_each_handled_signal_raises_interrupted_with_the_shells_exit_code():
    done = run("""
        import os, signal
        from kdpipe.interrupts import Interrupted, as_interrupts
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            try:
                with as_interrupts():
                    os.kill(os.getpid(), sig)
                    for _ in range(10**6):
                        pass
                print("not raised")
            except Interrupted as exc:
                print(exc.name, exc.exit_code, isinstance(exc, KeyboardInterrupt))
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)  # handlers put back
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == ["SIGTERM 143 True", "SIGHUP 129 True",
                                           "SIGINT 130 True", "True"]


def test_a_signal_inside_deferred_arrives_after_the_block():
    done = run("""
        import os, signal
        from kdpipe.interrupts import Interrupted, as_interrupts, deferred
        steps = []
        try:
            with as_interrupts():
                with deferred():
                    os.kill(os.getpid(), signal.SIGTERM)
                    steps.append("first rename")
                    steps.append("second rename")
                steps.append("after")
        except Interrupted as exc:
            steps.append(exc.name)
        print(steps)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['first rename', 'second rename', 'SIGTERM']"


def test_sigterm_is_passed_on_to_child_processes_ctrl_c_is_not():
    done = run("""
        import os, signal, subprocess, sys, time
        from kdpipe.interrupts import Interrupted, as_interrupts
        for sig in (signal.SIGTERM, signal.SIGINT):
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            time.sleep(0.5)
            try:
                with as_interrupts():
                    os.kill(os.getpid(), sig)
                    time.sleep(5)
            except Interrupted:
                pass
            try:
                print(sig.name, child.wait(timeout=10 if sig == signal.SIGTERM else 1))
            except subprocess.TimeoutExpired:
                print(sig.name, "running")
                child.kill()
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SIGTERM", str(-signal.SIGTERM), "SIGINT", "running"]
