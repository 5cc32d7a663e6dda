import ctypes
import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bridgecore.errors import BridgeError
from bridgecore.hf import writer as writer_module
from bridgecore.hf.reader import CheckpointReader
from bridgecore.hf.writer import ShardedWriter, check_target, leftover_temporaries, parse_size


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "z.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(4, 6, generator=g),
        "m.scale": torch.randn(2, generator=g).to(torch.float8_e5m2),
        "b.count": torch.tensor(3, dtype=torch.int64),
        "c.mask": torch.tensor([True, False]),
        "d.empty": torch.zeros(0, 3, dtype=torch.float16),
        "e.half": torch.randn(3, 3, generator=g).to(torch.float16),
    }


def _plan(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def _write_all(out: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str = "5GB") -> ShardedWriter:
    writer = ShardedWriter(out, _plan(tensors), max_shard_size)
    writer.create()
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    return writer


def test_single_file_equals_save_file_byte_for_byte(tmp_path: Path):
    tensors = _tensors()
    writer = _write_all(tmp_path / "out", tensors)
    writer.commit([writer.written()])
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


def test_shards_at_size_cap_match_save_file_and_index(tmp_path: Path):
    tensors = {f"layer.{i}.weight": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    writer = _write_all(tmp_path / "out", tensors, max_shard_size=100)
    writer.commit([writer.written()])
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 200}
    files = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert list(index["weight_map"].values()) == [files[0], files[0], files[1], files[1], files[2]]
    for file in files:
        part = {n: tensors[n] for n, f in index["weight_map"].items() if f == file}
        save_file(part, tmp_path / "reference.safetensors", metadata={"format": "pt"})
        assert (out / file).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    with CheckpointReader(out) as reader:
        assert all(torch.equal(reader.read(n, ()), t) for n, t in tensors.items())


def test_stacked_expert_slabs_written_out_of_order(tmp_path: Path):
    experts = torch.randn(4, 3, 2)
    writer = ShardedWriter(tmp_path / "out", [("experts.w", (4, 3, 2), torch.float32)])
    writer.create()
    for e in (2, 0, 3, 1):
        writer.write("experts.w", experts[e], expert=e)
    writer.commit([writer.written()])
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("experts.w"), experts)


def _write_part(out: Path, plan: list, temp_dir: Path, names: list[str], seed: int, queue) -> None:
    writer = ShardedWriter.attach(out, plan, 64, temp_dir)
    tensors = _tensors_for(plan, seed)
    for name in names:
        if name == "experts.w":
            for e in range(seed % 2, 4, 2):
                writer.write(name, tensors[name][e], expert=e)
        else:
            writer.write(name, tensors[name])
    queue.put(writer.written())


def _tensors_for(plan: list, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape, dtype in plan}


def test_processes_write_one_temp_dir_in_parallel(tmp_path: Path):
    plan = [
        ("a", (8, 2), torch.float32),
        ("experts.w", (4, 2, 2), torch.bfloat16),
        ("b", (3,), torch.float16),
        ("c", (16,), torch.float32),
    ]
    out = tmp_path / "out"
    owner = ShardedWriter(out, plan, 64)
    temp_dir = owner.create()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    parts = [["a", "experts.w"], ["experts.w", "b", "c"]]
    workers = [
        context.Process(target=_write_part, args=(out, plan, temp_dir, names, rank, queue))
        for rank, names in enumerate(parts)
    ]
    for worker in workers:
        worker.start()
    written = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    owner.commit(written)
    expected = _tensors_for(plan, 0)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    with CheckpointReader(out) as reader:
        assert reader.keys() and all(torch.equal(reader.read(n, ()), t) for n, t in expected.items())
    assert not temp_dir.exists()


@pytest.mark.parametrize(
    ("writes", "expected"),
    [
        ([("w", None)], r"s not written"),
        ([("w", None), ("w", None), ("s", 0), ("s", 1)], r"w written 2 times"),
        ([("w", None), ("s", 1)], r"s misses expert slabs \[0\]"),
        ([("w", None), ("s", None), ("s", 0), ("s", 1)], r"s written whole and as slabs \[0, 1\]"),
        ([("w", None), ("s", None), ("x", None)], r"x is not in the plan"),
    ],
)
def test_commit_verifies_coverage(tmp_path: Path, writes, expected: str):
    writer = ShardedWriter(tmp_path / "out", [("w", (2,), torch.float32), ("s", (2, 3), torch.float32)])
    writer.create()
    with pytest.raises(BridgeError, match=expected):
        writer.commit([writes])
    assert not (tmp_path / "out").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("tensor", "expert", "expected"),
    [
        (torch.zeros(2, 3, dtype=torch.bfloat16), None, "got torch.bfloat16 \\[2, 3\\], expected torch.float32"),
        (torch.zeros(3, 2), None, "got torch.float32 \\[3, 2\\], expected torch.float32 \\[2, 3\\]"),
        (torch.zeros(3), 2, "expert slab 2 is outside the planned shape \\[2, 3\\]"),
    ],
)
def test_write_checks_shape_and_dtype(tmp_path: Path, tensor: torch.Tensor, expert, expected: str):
    writer = ShardedWriter(tmp_path / "out", [("w", (2, 3), torch.float32)])
    writer.create()
    with pytest.raises(BridgeError, match=expected):
        writer.write("w", tensor, expert=expert)
    with pytest.raises(BridgeError, match="not in the export plan"):
        writer.write("v", tensor)


def test_file_size_mismatch_is_not_committed(tmp_path: Path):
    writer = _write_all(tmp_path / "out", {"w": torch.ones(4)})
    with open(writer.temp_dir / "model.safetensors", "ab") as file:
        file.write(b"junk")
    planned = writer.shards[0].size
    with pytest.raises(BridgeError, match=f"is {planned + 4} bytes, expected {planned} as planned"):
        writer.commit([writer.written()])
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_early_and_at_commit(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BridgeError, match="already exists"):
        check_target(out, overwrite=False)
    writer = _write_all(out, {"w": torch.ones(4)})
    with pytest.raises(BridgeError, match="already exists"):
        writer.commit([writer.written()])
    assert list(out.iterdir()) == []


def test_overwrite_keeps_old_output_until_new_one_is_complete(tmp_path: Path):
    out = tmp_path / "out"
    first = _write_all(out, {"w": torch.ones(4)})
    first.commit([first.written()])
    second = _write_all(out, {"w": torch.zeros(4)})
    check_target(out, overwrite=True)
    with pytest.raises(BridgeError, match="w not written"):
        second.commit([[]], overwrite=True)
    assert torch.equal(CheckpointReader(out).read("w"), torch.ones(4))
    second.commit([second.written()], overwrite=True)
    assert torch.equal(CheckpointReader(out).read("w"), torch.zeros(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _committed(out: Path, value: float, overwrite: bool = False) -> ShardedWriter:
    writer = _write_all(out, {"w": torch.full((4,), value)})
    writer.commit([writer.written()], overwrite=overwrite)
    return writer


def _value(out: Path) -> float:
    with CheckpointReader(out) as reader:
        return reader.read("w")[0].item()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_failed_final_move_keeps_the_previous_output(tmp_path: Path, monkeypatch, exchange: bool):
    """The move that replaces an output fails (the exchange, or the rename after the old output moved
    aside): one line, the previous output still at the target, nothing of the new one beside it."""
    out = tmp_path / "out"
    _committed(out, 1.0)
    if exchange:
        monkeypatch.setattr(writer_module, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(5, "I/O error")))
    else:
        monkeypatch.setattr(writer_module, "_exchange", lambda a, b: False)
        rename = Path.rename

        def new_output_fails(self: Path, target: Path) -> Path:
            if Path(target) == out and self.name.startswith(".out.tmp"):
                raise OSError(5, "I/O error")
            return rename(self, target)

        monkeypatch.setattr(Path, "rename", new_output_fails)
    second = _write_all(out, {"w": torch.full((4,), 2.0)})
    with pytest.raises(BridgeError) as failed:
        second.commit([second.written()], overwrite=True)
    assert str(failed.value) == f"{out}: could not move the finished checkpoint into place (I/O error)"
    second.abort()
    monkeypatch.undo()
    assert _value(out) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replacing_an_output_is_one_atomic_exchange(tmp_path: Path, monkeypatch):
    """Where the file system can exchange two paths, the target never lacks an output: the old one is
    swapped out in one step and removed from the temporary's place."""
    out = tmp_path / "out"
    _committed(out, 1.0)
    seen = []
    exchange = writer_module._exchange

    def watched(a: Path, b: Path) -> bool:
        before = _value(b)
        swapped = exchange(a, b)
        seen.append((before, swapped, _value(b), _value(a)))
        return swapped

    monkeypatch.setattr(writer_module, "_exchange", watched)
    _committed(out, 2.0, overwrite=True)
    assert seen == [(1.0, True, 2.0, 1.0)] and _value(out) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_side_files_are_copied(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    (src / "modeling_x.py").write_text("")
    writer = _write_all(tmp_path / "out", {"w": torch.ones(4)})
    writer.commit([writer.written()], side_files_from=src)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


def test_abort_removes_everything(tmp_path: Path):
    writer = _write_all(tmp_path / "out", {"w": torch.ones(4)})
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_attach_refuses_a_foreign_temp_dir(tmp_path: Path):
    writer = ShardedWriter(tmp_path / "out", [("w", (4,), torch.float32)])
    temp_dir = writer.create()
    with pytest.raises(BridgeError, match="expected the file `create` made for this plan"):
        ShardedWriter.attach(tmp_path / "out", [("w", (8,), torch.float32)], "5GB", temp_dir)


def test_plan_errors(tmp_path: Path):
    with pytest.raises(BridgeError, match="appears twice"):
        ShardedWriter(tmp_path / "out", [("w", (4,), torch.float32), ("w", (4,), torch.float32)])
    with pytest.raises(BridgeError, match="^w: .*has no safetensors code"):
        ShardedWriter(tmp_path / "out", [("w", (4,), torch.complex128)])


@pytest.mark.parametrize(
    ("size", "expected"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), (1234, 1234), ("1.5KB", 1500)]
)
def test_parse_size(size, expected: int):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5XB", "", "-1GB", 0, "GB"])
def test_parse_size_errors(size):
    with pytest.raises(BridgeError, match="shard size"):
        parse_size(size)


def test_attach_takes_the_temp_dir_create_made(tmp_path: Path):
    plan = [("w", (4,), torch.float32)]
    writer = ShardedWriter(tmp_path / "out", plan, files={"w": "model.safetensors"})
    temp_dir = writer.create()
    other = ShardedWriter.attach(tmp_path / "out", plan, "5GB", temp_dir, files={"w": "model.safetensors"})
    other.write("w", torch.arange(4.0))
    writer.commit([other.written()])
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.arange(4.0))
    (temp_dir := ShardedWriter(tmp_path / "two", plan).create()).joinpath("model.safetensors").unlink()
    with pytest.raises(BridgeError, match=r"model.safetensors: missing or not \d+ bytes"):
        ShardedWriter.attach(tmp_path / "two", plan, "5GB", temp_dir)


def test_exchange_swaps_two_directories(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("from a"), (b / "y").write_text("from b")
    assert writer_module._exchange(a, b)
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]
    with pytest.raises(OSError) as missing:
        writer_module._exchange(a, tmp_path / "none")
    assert (missing.value.errno, missing.value.strerror, missing.value.filename) == (
        errno.ENOENT,
        os.strerror(errno.ENOENT),
        str(tmp_path / "none"),
    )


class _Libc:
    """A C library whose renameat2 fails with `code`, or that has none (code None)."""

    def __init__(self, code: int | None):
        if code is not None:
            self.renameat2 = lambda *args: (ctypes.set_errno(code), -1)[1]


@pytest.mark.parametrize(
    ("code", "swaps"), [(None, False), (errno.EINVAL, False), (errno.ENOSYS, False), (errno.EOPNOTSUPP, False)]
)
def test_exchange_says_where_the_system_cannot_swap(tmp_path: Path, monkeypatch, code, swaps: bool):
    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kw: _Libc(code))
    assert writer_module._exchange(tmp_path / "a", tmp_path / "b") is swaps


def test_exchange_raises_what_the_system_refused(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kw: _Libc(errno.EACCES))
    with pytest.raises(PermissionError) as refused:
        writer_module._exchange(tmp_path / "a", tmp_path / "b")
    assert (refused.value.errno, refused.value.filename) == (errno.EACCES, str(tmp_path / "b"))


def test_leftover_temporaries_are_the_hidden_siblings_of_every_kind(tmp_path: Path):
    out = tmp_path / "out[1]"
    assert leftover_temporaries(tmp_path / "no" / "out") == []
    for name in (".out[1].tmp-ab", ".out[1].old-cd", ".out[1].staging-ef", ".out[1].other-gh", ".out.tmp-ij", "out[1]"):
        (tmp_path / name).mkdir()
    assert [p.name for p in leftover_temporaries(out)] == [".out[1].old-cd", ".out[1].staging-ef", ".out[1].tmp-ab"]


def test_replacing_an_output_by_two_renames_leaves_nothing_beside_it(tmp_path: Path, monkeypatch):
    """Where the file system cannot exchange, the old output is moved aside as a hidden `.old-*`
    sibling (which an interrupted run would leave for the next to name) and removed after the move."""
    out = tmp_path / "out"
    _committed(out, 1.0)
    monkeypatch.setattr(writer_module, "_exchange", lambda a, b: False)
    aside = []
    rename = Path.rename

    def watched(self: Path, target: Path) -> Path:
        if self == out:
            aside.append(Path(target).name)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", watched)
    _committed(out, 2.0, overwrite=True)
    assert len(aside) == 1 and aside[0].startswith(".out.old-")
    assert _value(out) == 2.0 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOTEMPTY, "appeared while this run was writing; pass --overwrite to replace it"),
        (errno.EEXIST, "appeared while this run was writing; pass --overwrite to replace it"),
        (errno.ENOENT, "could not move the finished checkpoint into place (No such file or directory)"),
    ],
)
def test_a_failed_move_to_a_new_output_says_why(tmp_path: Path, monkeypatch, code: int, expected: str):
    out = tmp_path / "out"
    writer = _write_all(out, {"w": torch.ones(4)})
    monkeypatch.setattr(Path, "rename", lambda self, target: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    with pytest.raises(BridgeError) as failed:
        writer.commit([writer.written()])
    assert str(failed.value) == f"{out}: {expected}"


def test_coverage_errors_show_ten_problems_and_count_the_rest(tmp_path: Path):
    plan = [(f"w{i:02d}", (1,), torch.float32) for i in range(12)]
    writer = ShardedWriter(tmp_path / "out", plan)
    writer.create()
    shown = "; ".join(f"w{i:02d} not written" for i in range(10))
    with pytest.raises(BridgeError) as failed:
        writer.commit([[]])
    assert str(failed.value) == (
        f"{tmp_path / 'out'}: not committed, expected every planned tensor written once: {shown}; and 2 more"
    )
    with pytest.raises(BridgeError) as failed:
        writer.commit([[(f"w{i:02d}", None) for i in range(2, 12)]])
    assert str(failed.value).endswith("written once: w00 not written; w01 not written")
    with pytest.raises(BridgeError, match=r"written once: w00\[3\] written 2 times"):
        writer.commit([[("w00", 3), ("w00", 3)] + [(f"w{i:02d}", None) for i in range(1, 12)]])


def test_a_shard_holds_tensors_up_to_exactly_its_size(tmp_path: Path):
    tensors = {"b": torch.ones(2), "a": torch.zeros(2), "c": torch.ones(1)}  # 8, 8 and 4 bytes
    writer = _write_all(tmp_path / "out", tensors, max_shard_size=16)
    writer.commit([writer.written()])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    assert index["weight_map"] == {"b": first, "a": first, "c": second}
    # the index is written as transformers writes it; within a file, tensors are in save_file's order
    text = (tmp_path / "out" / "model.safetensors.index.json").read_text()
    assert text == json.dumps(index, indent=2) + "\n"
    save_file({"b": tensors["b"], "a": tensors["a"]}, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "out" / first).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_parse_size_takes_one_byte_and_refuses_a_bool():
    assert parse_size(1) == 1 and parse_size("1B") == 1
    with pytest.raises(BridgeError, match="shard size True is not understood"):
        parse_size(True)


def test_a_tensor_is_written_in_pieces_when_larger_than_one_write(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(writer_module, "_MAX_WRITE", 3)  # 16 bytes in writes of 3
    tensors = {"w": torch.arange(4.0)}
    writer = _write_all(tmp_path / "out", tensors)
    writer.commit([writer.written()])
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_write_names_the_slab_it_refuses_and_needs_a_temp_dir(tmp_path: Path):
    out = tmp_path / "deep" / "er" / "out"  # parents are made
    writer = ShardedWriter(out, [("s", (2, 3), torch.float32)])
    writer.create()
    with pytest.raises(BridgeError) as refused:
        writer.write("s", torch.zeros(2), expert=1)
    assert str(refused.value).startswith("s[1]: got torch.float32 [2], expected")
    with pytest.raises(BridgeError) as refused:
        writer.write("s", torch.zeros(3))
    assert str(refused.value).startswith("s: got torch.float32 [3], expected")
    writer.abort()
    with pytest.raises(BridgeError) as refused:
        writer.write("s", torch.zeros(2, 3))
    assert str(refused.value) == f"{out}: writer has no temporary directory; expected create() or attach() first"


def test_a_source_layout_of_one_named_file_is_still_indexed(tmp_path: Path):
    plan = [("w", (2,), torch.float32)]
    writer = ShardedWriter(tmp_path / "out", plan, files={"w": "model-00001-of-00001.safetensors"})
    writer.create()
    writer.write("w", torch.ones(2))
    writer.commit([writer.written()])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"w": "model-00001-of-00001.safetensors"}


def test_targets_and_temporary_names(tmp_path: Path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    (tmp_path / "file").write_text("")
    for name in ("link", "file"):
        with pytest.raises(BridgeError) as refused:
            check_target(tmp_path / name, overwrite=True)
        assert str(refused.value) == (
            f"{tmp_path / name}: exists and is not a directory; expected a new or existing output directory"
        )
    sibling = writer_module.temporary_sibling(tmp_path / "out", "tmp")
    assert sibling.parent == tmp_path and re.fullmatch(r"\.out\.tmp-[0-9a-f]{8}", sibling.name)


def test_a_temporary_is_removed_with_sigint_and_sigterm_held(tmp_path: Path, monkeypatch):
    """Held on the main thread while it goes (then delivered); a missing one is no error."""
    held = []
    rmtree = shutil.rmtree

    def watched(path, ignore_errors=False):
        held.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", watched)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    (tmp_path / "t" / "x").mkdir(parents=True)
    writer_module.remove_temporary(tmp_path / "t")
    writer_module.remove_temporary(tmp_path / "missing")
    assert not (tmp_path / "t").exists() and signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert all({signal.SIGINT, signal.SIGTERM} <= mask for mask in held) and len(held) == 2


def test_exchange_takes_paths_relative_to_the_working_directory(tmp_path: Path, monkeypatch):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("")
    monkeypatch.chdir(tmp_path)
    assert writer_module._exchange(Path("a"), Path("b"))
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["x"]


def test_a_source_layout_refuses_a_name_twice(tmp_path: Path):
    plan = [("w", (2,), torch.float32), ("w", (2,), torch.float32)]
    with pytest.raises(BridgeError, match="^w: appears twice in the export plan"):
        ShardedWriter(tmp_path / "out", plan, files={"w": "model.safetensors"})
