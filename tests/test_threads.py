"""The thread count chosen with set_threads holds in every thread that runs the model.

Numba keeps its thread count per calling thread: a thread it was never set in uses every core. The server's
engine thread and the thread Ray Data runs a batch function in are such threads, so the model's entry points
apply the chosen count themselves (kernels/threads.use_threads)."""
import threading

import numba
import pytest

import rwkv_lite
from rwkv_lite.demo import demo_model_path
from rwkv_lite.kernels import threads


@pytest.fixture
def one_thread():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs a pool of at least 2 threads to tell 1 from the default")
    before = numba.get_num_threads()
    threads.set_threads(1)
    yield
    threads.set_threads(before)


def _count_after(fn) -> int:
    seen = []

    def work():
        fn()
        seen.append(numba.get_num_threads())
    t = threading.Thread(target=work)
    t.start()
    t.join()
    return seen[0]


def test_a_new_thread_starts_with_every_core(one_thread):
    # the behaviour the entry points work around; if Numba ever shares the count, this test says so
    assert _count_after(lambda: None) == numba.config.NUMBA_NUM_THREADS


def test_forward_and_forward_batch_use_the_chosen_count_in_any_thread(one_thread):
    model = rwkv_lite.load(demo_model_path())
    assert _count_after(lambda: model.forward([1, 2])) == 1
    states = [model.new_state(), model.new_state()]
    assert _count_after(lambda: model.forward_batch([1, 2], states)) == 1


def test_without_a_choice_nothing_is_imposed(monkeypatch):
    monkeypatch.setattr(threads, "_chosen", None)
    before = numba.get_num_threads()
    threads.use_threads()
    assert numba.get_num_threads() == before
