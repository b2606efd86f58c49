"""Ctrl-C waits for a storage write to finish, and acts at once elsewhere."""

from __future__ import annotations

import os
import signal

import pytest

from dsnas.interrupts import InterruptGuard


def test_interrupt_during_a_write_is_raised_when_the_write_ends():
    guard = InterruptGuard()
    done = []
    with guard.installed():
        with pytest.raises(KeyboardInterrupt):
            with guard.writing():
                os.kill(os.getpid(), signal.SIGINT)
                with guard.writing():  # nested writes finish too
                    done.append("inner")
                done.append("outer")
    assert done == ["inner", "outer"]


def test_interrupt_outside_a_write_acts_at_once_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGINT)
    guard = InterruptGuard()
    with guard.installed():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("not interrupted")
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_is_held_during_a_write_like_ctrl_c_and_says_it_was_a_termination():
    from dsnas.interrupts import Terminated

    before = signal.getsignal(signal.SIGTERM)
    guard = InterruptGuard()
    done = []
    with guard.installed():
        with pytest.raises(Terminated):
            with guard.writing():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("written")
    assert done == ["written"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_that_a_library_turned_into_a_plain_keyboardinterrupt_is_still_a_termination():
    """Ray's core checks for signals while the driver waits, and raises KeyboardInterrupt for the handler's
    Terminated: the search exited 130 ("interrupted") for a SIGTERM. And ray.init's own SIGTERM handler, put in
    place of the guard's, exited at once mid-write (134) until the guard took it back."""
    from dsnas.interrupts import Terminated

    guard = InterruptGuard()
    with pytest.raises(Terminated):
        with guard.installed():
            signal.signal(signal.SIGTERM, lambda *_: os._exit(99))  # a library's handler, as ray.init sets one
            guard.reroute()
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                raise AssertionError("not terminated")
            except Terminated:
                raise KeyboardInterrupt from None  # what Ray's check_signals makes of it


def test_a_wait_inside_a_write_takes_an_interrupt_at_once_and_the_write_defers_again_after():
    """The driver waits for the measurement gate inside a dispatch (a write): a Ctrl-C there acted only when another
    process let the gate go, minutes later."""
    guard = InterruptGuard()
    with guard.installed():
        with pytest.raises(KeyboardInterrupt):  # pending from the write, raised as the wait begins
            with guard.writing():
                os.kill(os.getpid(), signal.SIGINT)
                with guard.waiting():
                    raise AssertionError("the pending interrupt did not act")
        with pytest.raises(KeyboardInterrupt):  # arriving during the wait: at once
            with guard.writing(), guard.waiting():
                os.kill(os.getpid(), signal.SIGINT)
                raise AssertionError("not interrupted")
        done = []
        with pytest.raises(KeyboardInterrupt):  # after the wait, the write defers again
            with guard.writing():
                with guard.waiting():
                    pass
                os.kill(os.getpid(), signal.SIGINT)
                done.append("written")
        assert done == ["written"]
