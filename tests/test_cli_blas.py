"""The offline commands limit BLAS threads (``blas_threads``) as the service does: ``replay``,
``score``, ``requeue`` and ``demo`` run the engine (or the audit's fit) in their own process, and
the libraries' default of one thread per core cost the engine 5-7× the CPU per event on a 2-core
machine (docs/benchmarks.md, section ``service``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from stream_influence.cli import main
from stream_influence.errors import ConfigError
from tests.fixtures.service_events import events


def _blas_threads() -> set[int]:
    return {int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"}


def _recording(seen: list[set[int]], fn: Callable[..., Any] | None = None, result: Any = None) -> Any:
    """A stand-in for the command's work that records the BLAS threads in force when it runs."""

    def work(*args: Any, **kwargs: Any) -> Any:
        seen.append(_blas_threads())
        if isinstance(result, BaseException):
            raise result
        return fn(*args, **kwargs) if fn is not None else result

    return work


@pytest.fixture
def two_threads() -> Any:
    """BLAS at two threads for the test (what the libraries' default is on this machine), restored after."""
    if not _blas_threads():
        pytest.skip("no BLAS library loaded")
    with threadpool_limits(limits=2, user_api="blas"):
        if _blas_threads() != {2}:
            pytest.skip("BLAS cannot run 2 threads here")
        yield


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _config(tmp_path: Path, blas_threads: int | None) -> list[str]:
    text = f"checkpoint:\n  directory: {tmp_path / 'ck'}\n"
    if blas_threads is not None:
        text += f"blas_threads: {blas_threads}\n"
    (tmp_path / "cfg.yaml").write_text(text)
    return ["--config", str(tmp_path / "cfg.yaml")]


@pytest.mark.parametrize(("blas_threads", "expected"), [(None, {1}), (0, {2})])
@pytest.mark.parametrize("command", ["replay", "score", "requeue", "demo"])
def test_each_offline_command_limits_blas_threads(
    command: str,
    blas_threads: int | None,
    expected: set[int],
    tmp_path: Path,
    two_threads: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default (one thread) is in force while the command's work runs; ``blas_threads: 0``
    leaves the libraries' own setting."""
    seen: list[set[int]] = []
    train = _jsonl(tmp_path / "train.jsonl", events(120, d=4, k=3, noise=0.2, seed=1)[0])
    ref = _jsonl(tmp_path / "ref.jsonl", events(60, d=4, k=3, seed=2, prefix="ref")[0])
    if blas_threads is not None:
        monkeypatch.setenv("STREAM_INFLUENCE_BLAS_THREADS", str(blas_threads))
    if command == "replay":
        import stream_influence.cli.replay as cmd

        monkeypatch.setattr(cmd, "replay", _recording(seen, cmd.replay))
        argv = ["replay", str(train), "--reference", str(ref), "--quiet", *_config(tmp_path, blas_threads)]
        assert main(argv) == 0
    elif command == "score":
        import stream_influence.cli.score as cmd

        monkeypatch.setattr(cmd, "score_dataset", _recording(seen, cmd.score_dataset))
        argv = ["score", "--train", str(train), "--reference", str(ref), "--out", str(tmp_path / "s.jsonl")]
        assert main(argv) == 0  # without --config: the default (or the environment's) blas_threads
    elif command == "requeue":
        import stream_influence.cli.requeue as cmd

        monkeypatch.setattr(cmd, "requeue", _recording(seen, result=ConfigError("stand-in: no broker")))
        assert main(["requeue", "--from-quarantine", "--dry-run", *_config(tmp_path, blas_threads)]) == 2
    else:
        import stream_influence.tooling.demo as cmd

        monkeypatch.setattr(cmd, "run_demo", _recording(seen, result={}))
        assert main(["demo", "--json", "--out", str(tmp_path / "demo")]) == 0
    assert seen == [expected]
