"""Thread control: tiles side by side on one BLAS thread each, element-wise passes inside them."""

import threading

import numpy as np

from kernelfit.parallel import blas_threads, parallel_row_blocks, parallel_tasks


def test_parallel_tasks_run_every_item_once_on_one_blas_thread_and_restore_it(blas_thread_counts):
    before = blas_thread_counts()
    assert before and blas_threads() == max(before)
    seen, counts, lock = [], [], threading.Lock()

    def task(item):
        with lock:
            seen.append(item)
            counts.append(blas_thread_counts())

    parallel_tasks(task, range(20), workers=2)
    assert sorted(seen) == list(range(20))
    assert counts == [[1] * len(before)] * 20
    assert blas_thread_counts() == before


def test_row_blocks_inside_a_task_run_on_the_task_thread():
    """A task's element-wise pass runs serially on its own thread: each task already has a core, and
    sending its rows to the pool would put twice as many busy threads as cores."""
    tiles = np.zeros((4, 1024, 2048))        # 2M elements a tile: big enough to go to the pool
    ran_on, lock = [], threading.Lock()

    def task(i):
        def fill(rows):
            tiles[i, rows] = i + 1
            with lock:
                ran_on.append((i, threading.get_ident()))

        parallel_row_blocks(tiles.shape[1], tiles[i].size, fill)
        with lock:
            ran_on.append((i, ("task", threading.get_ident())))

    parallel_tasks(task, range(4), workers=2)
    for i in range(4):
        idents = [t for j, t in ran_on if j == i]
        assert idents == [idents[0], ("task", idents[0])]       # one call, on the task's thread
        assert np.all(tiles[i] == i + 1)


def test_one_worker_runs_in_the_calling_thread():
    idents = []
    parallel_tasks(lambda i: idents.append(threading.get_ident()), range(3), workers=1)
    assert idents == [threading.get_ident()] * 3
