"""The supervisor process never loads torch: inspected in the running process, not the source."""

import psutil


def loaded_torch_files(pid: int) -> list[str]:
    """Shared objects and Python files of torch mapped or open in the process."""
    proc = psutil.Process(pid)
    paths = [m.path for m in proc.memory_maps()] + [f.path for f in proc.open_files()]
    return sorted({p for p in paths if "/torch/" in p or "libtorch" in p})


def test_running_supervisor_has_no_torch(shared_supervisor):
    assert loaded_torch_files(shared_supervisor.pid) == []


def test_the_check_sees_torch_in_a_worker(shared_supervisor):
    """The same inspection finds torch in a worker, so the check above can fail."""
    worker = sorted(shared_supervisor.remember_workers())[0]
    assert any("libtorch" in p for p in loaded_torch_files(worker))
