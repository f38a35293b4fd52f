"""Producer threads are kept for the next turn (issue 14: no thread start on a
turn's path) and end when no turn comes for a while."""
import threading

from chatbot.generation import Producers
from conftest import wait_for


def run_and_wait(producers, task):
    done = threading.Event()
    producers.run(lambda: (task(), done.set()))
    assert done.wait(5)


def test_a_producer_thread_that_finished_takes_the_next_turn():
    producers, threads = Producers(), []
    for _ in range(3):
        run_and_wait(producers, lambda: threads.append(threading.get_ident()))
        assert wait_for(lambda: len(producers.idle) == 1)
    assert len(set(threads)) == 1


def test_turns_at_once_get_threads_of_their_own():
    producers, release, running = Producers(), threading.Event(), []

    def task():
        running.append(threading.get_ident())
        release.wait(5)
    for _ in range(3):
        producers.run(task)
    assert wait_for(lambda: len(running) == 3)
    assert len(set(running)) == 3
    release.set()
    assert wait_for(lambda: len(producers.idle) == 3)


def test_an_idle_producer_thread_ends_and_a_failed_task_does_not_kill_one():
    producers = Producers()
    producers.IDLE_SECONDS = 0.2
    threads = []

    def fail():
        threads.append(threading.current_thread())
        raise RuntimeError("boom")
    producers.run(fail)
    assert wait_for(lambda: threads and not threads[0].is_alive(), timeout=5)
    assert producers.idle == []
    run_and_wait(producers, lambda: None)   # a new thread starts when none is idle
