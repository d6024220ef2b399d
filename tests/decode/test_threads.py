import sys
import threading

import pytest
import torch

from restspec.decode.threads import release_openmp_pool

GNU_OPENMP = sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()


def _parallel_work() -> torch.Tensor:
    a = torch.arange(256 * 256, dtype=torch.float32).reshape(256, 256) / 65536
    return a @ a


@pytest.mark.skipif(not GNU_OPENMP, reason="GNU OpenMP thread pools: torch's Linux builds")
def test_a_thread_gives_back_its_pool_and_computes_the_same_after():
    expected = _parallel_work()
    results: list[object] = []

    def worker() -> None:
        _parallel_work()
        results.append(release_openmp_pool())
        results.append(_parallel_work())  # a new pool starts on demand

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert results[0] is True
    assert torch.equal(results[1], expected)
    assert release_openmp_pool() is True  # the main thread's pool, too
    assert torch.equal(_parallel_work(), expected)
