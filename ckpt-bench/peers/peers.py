"""Peer comparison for ckpt-bench: the same synthetic state saved by other
checkpointing tools, each timed for how long the training loop is blocked
and how long until the checkpoint is durable on disk.

The state matches ckpt-bench's: --state-bytes split into --tensors float32
tensors of equal size (each a multiple of 4 bytes) named layer.<i>.w, filled
with incompressible random bytes. Every tool runs in its own subprocess so
its peak RSS is its own; each does one warm-up save (restored and compared
byte for byte with the state) and --iters measured saves, of which the
median, min and max are reported. In the same run two floors are measured:
a memcpy of the state into a reused, pre-touched buffer and a raw write +
fsync of the same bytes in 8 MiB writes.

Tools: safetensors (numpy save_file + fsync), Orbax's async
CheckpointManager on jax CPU, ckpt itself (target/release/ckpt-bench stage
and flush on the same state and directory), and, where torch is installed,
torch.save + fsync and torch.distributed.checkpoint.async_save on CPU
tensors (the default stager, the caching DefaultStager, the thread and the
process checkpointer), and from the GPU where CUDA is available.
"""
import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GIB = 1 << 30
WRITE_UNIT = 8 << 20


@dataclass(frozen=True)
class Spec:
    """The synthetic state: `tensors` float32 tensors of `tensor_bytes` each."""

    tensors: int
    tensor_bytes: int

    @property
    def state_bytes(self) -> int:
        """Total bytes of the state."""
        return self.tensors * self.tensor_bytes

    def arrays(self):
        """Yields (name, array) per tensor, each built only when asked for,
        so a tool can convert it before the next one exists."""
        for i in range(self.tensors):
            rng = np.random.default_rng(i)
            bits = rng.integers(0, 1 << 32, size=self.tensor_bytes // 4, dtype=np.uint32)
            yield f"layer.{i}.w", bits.view(np.float32)


def parse_bytes(text: str) -> int:
    """Parses sizes like 2G, 512M, 64k, 1000 (bytes), as ckpt-bench does."""
    s = text.strip()
    i = next((k for k, c in enumerate(s) if c.isalpha()), len(s))
    suffix = s[i:].lower().removesuffix("ib").removesuffix("b")
    mults = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if suffix not in mults:
        raise argparse.ArgumentTypeError(f"unknown size suffix `{suffix}` in `{s}`")
    try:
        return int(float(s[:i]) * mults[suffix])
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{s}` is not a size like 2G or 512M") from None


def fsync_path(path: Path) -> None:
    """fsyncs one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsyncs every file and directory under `root`, `root` itself and its
    parent (which holds the entry for `root`)."""
    if not root.is_dir():
        raise FileNotFoundError(root)
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath, f))
        fsync_path(Path(dirpath))
    fsync_path(root.parent)


def peak_rss() -> int:
    """Peak resident set size of this process (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the peak read
    later covers the measured saves only: the resident state and whatever
    the tool keeps or allocates, not the transients of building the state
    or of reading the warm-up save back. Where the kernel refuses, the peak
    covers those too."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def versions(*packages: str) -> dict:
    """Installed versions of `packages`, and Python's."""
    out = {"python": platform.python_version()}
    out.update({p: importlib.metadata.version(p) for p in packages})
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two float32 arrays hold the same bytes (NaN payloads included)."""
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


class Bench:
    """One way of saving the state. `save` times one save and returns at
    least blocking_s and durable_s; `verify` reads a save back and compares
    it with the state (None where there is nothing to read back); `remove`
    deletes a save's files."""

    packages: tuple = ("numpy",)
    notes = ""

    def save(self, step: int) -> dict:
        raise NotImplementedError

    def verify(self, step: int) -> bool | None:
        return None

    def remove(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MemcpyFloor(Bench):
    """np.copyto of every tensor into one reused, pre-touched buffer."""

    notes = "np.copyto into a reused, pre-touched buffer (one thread)"

    def __init__(self, spec: Spec, workdir: Path):
        self.arrays = [a for _, a in spec.arrays()]
        self.dst = np.ones(spec.tensor_bytes // 4, dtype=np.float32)

    def save(self, step: int) -> dict:
        t = time.perf_counter()
        for a in self.arrays:
            np.copyto(self.dst, a)
        d = time.perf_counter() - t
        return {"blocking_s": d, "durable_s": None}


class RawWriteFloor(Bench):
    """The state's bytes written back to back into one file in 8 MiB writes,
    then fsync."""

    notes = "one file, 8 MiB writes, fsync"

    def __init__(self, spec: Spec, workdir: Path):
        self.arrays = [a for _, a in spec.arrays()]
        self.workdir = workdir

    def path(self, step: int) -> Path:
        return self.workdir / f"raw-{step}.bin"

    def save(self, step: int) -> dict:
        t = time.perf_counter()
        with open(self.path(step), "wb", buffering=0) as f:
            for a in self.arrays:
                view = memoryview(a).cast("B")
                for off in range(0, len(view), WRITE_UNIT):
                    piece = view[off : off + WRITE_UNIT]
                    while piece:
                        piece = piece[f.write(piece) :]
            os.fsync(f.fileno())
        d = time.perf_counter() - t
        return {"blocking_s": d, "durable_s": d}

    def remove(self, step: int) -> None:
        self.path(step).unlink()


class Safetensors(Bench):
    """safetensors.numpy.save_file, then fsync of the file and its directory:
    the loop is blocked until the checkpoint is durable."""

    packages = ("numpy", "safetensors")
    notes = "save_file, then fsync of the file and its directory"

    def __init__(self, spec: Spec, workdir: Path):
        import safetensors.numpy

        self.st = safetensors.numpy
        self.state = dict(spec.arrays())
        self.workdir = workdir

    def path(self, step: int) -> Path:
        return self.workdir / f"step-{step}.safetensors"

    def save(self, step: int) -> dict:
        t = time.perf_counter()
        self.st.save_file(self.state, self.path(step))
        fsync_path(self.path(step))
        fsync_path(self.workdir)
        d = time.perf_counter() - t
        return {"blocking_s": d, "durable_s": d}

    def verify(self, step: int) -> bool:
        back = self.st.load_file(self.path(step))
        return back.keys() == self.state.keys() and all(
            same_bits(back[k], v) for k, v in self.state.items()
        )

    def remove(self, step: int) -> None:
        self.path(step).unlink()


class Orbax(Bench):
    """Orbax's CheckpointManager with its defaults (async) saving a pytree of
    jax arrays already on the CPU device. Blocking: until save() returns.
    Durable: until wait_until_finished() returns, plus an fsync pass over
    every file and directory of the step (orbax_finished_s is without it).
    Old steps are deleted with manager.delete() after the timing. On the
    CPU device the "device to host" transfer is a view of the jax buffer, so
    save() returns without copying the state (jax arrays are immutable)."""

    packages = ("numpy", "jax", "jaxlib", "orbax-checkpoint", "tensorstore")
    notes = (
        "on the CPU device save() copies nothing: it keeps the immutable jax "
        "buffers (np.asarray is a view) until they are written; "
        "orbax itself does not fsync: tensorstore fsyncs the array data files and "
        "their directories, not orbax's metadata files nor the rename of the step "
        "directory (orbax-checkpoint 0.12.8, seen with strace); durable adds an "
        "fsync pass over the step"
    )

    def __init__(self, spec: Spec, workdir: Path):
        import jax
        import orbax.checkpoint as ocp

        # save() takes the time our own wait_until_finished() took for its
        # wait on the previous save and warns past 1 s; the timed save()
        # itself found nothing to wait for.
        logging.getLogger("absl").addFilter(
            lambda r: not r.getMessage().startswith("Waiting for previous save")
        )
        self.ocp = ocp
        self.tree = {name: jax.device_put(a) for name, a in spec.arrays()}
        jax.block_until_ready(self.tree)
        self.root = workdir.resolve()
        self.manager = ocp.CheckpointManager(self.root)

    def save(self, step: int) -> dict:
        t = time.perf_counter()
        self.manager.save(step, args=self.ocp.args.StandardSave(self.tree))
        blocking = time.perf_counter() - t
        self.manager.wait_until_finished()
        finished = time.perf_counter() - t
        fsync_tree(self.root / str(step))
        durable = time.perf_counter() - t
        return {"blocking_s": blocking, "durable_s": durable, "orbax_finished_s": finished}

    def verify(self, step: int) -> bool:
        back = self.manager.restore(step, args=self.ocp.args.StandardRestore(self.tree))
        return back.keys() == self.tree.keys() and all(
            same_bits(np.asarray(back[k]), np.asarray(v)) for k, v in self.tree.items()
        )

    def remove(self, step: int) -> None:
        self.manager.delete(step)

    def close(self) -> None:
        self.manager.close()


class TorchSave(Bench):
    """torch.save of a dict of CPU tensors (sharing the state's memory), then
    fsync of the file and its directory: blocking = durable."""

    packages = ("numpy", "torch")
    notes = "torch.save, then fsync of the file and its directory"

    def __init__(self, spec: Spec, workdir: Path):
        import torch

        self.torch = torch
        self.state = {name: torch.from_numpy(a) for name, a in spec.arrays()}
        self.workdir = workdir

    def path(self, step: int) -> Path:
        return self.workdir / f"step-{step}.pt"

    def save(self, step: int) -> dict:
        t = time.perf_counter()
        self.torch.save(self.state, self.path(step))
        fsync_path(self.path(step))
        fsync_path(self.workdir)
        d = time.perf_counter() - t
        return {"blocking_s": d, "durable_s": d}

    def verify(self, step: int) -> bool:
        back = self.torch.load(self.path(step), weights_only=True)
        return back.keys() == self.state.keys() and all(
            same_bits(back[k].numpy(), v.numpy()) for k, v in self.state.items()
        )

    def remove(self, step: int) -> None:
        self.path(step).unlink()


class TorchDcp(Bench):
    """torch.distributed.checkpoint.async_save of tensors on `device`, single
    process without a process group (no_dist=True), FileSystemWriter.
    `stager`: "default" (DCP's own, made per save) or "cached" (one
    DefaultStager with async staging, kept across saves: its staging buffers
    are reused); `kind`: the thread or the process checkpointer. Blocking:
    until staging completes (async_save's return, or its
    staging_completion future). Durable: until the upload future's result
    (the writer fsyncs its files by default), plus an fsync pass over the
    checkpoint directory (dcp_finished_s is without it)."""

    packages = ("numpy", "torch")

    def __init__(self, spec: Spec, workdir: Path, device: str, stager: str, kind: str):
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        # Single process on purpose: no_dist=True.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        self.torch = torch
        self.dcp = dcp
        self.kind = AsyncCheckpointerType.PROCESS if kind == "process" else AsyncCheckpointerType.THREAD
        self.state = {name: torch.from_numpy(a).to(device) for name, a in spec.arrays()}
        if device == "cuda":
            torch.cuda.synchronize()
        self.stager = None
        if stager == "cached":
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = device == "cuda"
            # On the CPU: no pinned memory (it needs CUDA), staging on the
            # stager's own thread, buffers kept across saves.
            self.stager = DefaultStager(StagingOptions(
                use_pinned_memory=cuda, use_shared_memory=kind == "process",
                use_async_staging=True, use_non_blocking_copy=cuda,
            ))
        self.workdir = workdir
        # The process checkpointer needs a process group even for one rank:
        # a gloo group of one, its store a file (no network).
        self.no_dist = kind != "process"
        if not self.no_dist:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"file://{workdir.resolve()}/.pg-store",
                                    rank=0, world_size=1)
        self.notes = (
            f"{'caching DefaultStager (async staging, buffers reused)' if stager == 'cached' else 'default stager'}, "
            f"{kind} checkpointer, on {device}; blocked until staging completes; its FileSystemWriter "
            "fsyncs its files (sync_files=True), not the directory; durable adds an fsync pass over "
            "the checkpoint"
        )

    def path(self, step: int) -> Path:
        return self.workdir / f"step-{step}"

    def save(self, step: int) -> dict:
        t = time.perf_counter()
        kwargs = {"checkpoint_id": self.path(step), "no_dist": self.no_dist,
                  "async_checkpointer_type": self.kind}
        if self.stager is not None:
            kwargs["async_stager"] = self.stager
        r = self.dcp.async_save(self.state, **kwargs)
        upload = getattr(r, "upload_completion", r)
        staging = getattr(r, "staging_completion", None)
        if staging is not None:
            staging.result()
        blocking = time.perf_counter() - t
        upload.result()
        finished = time.perf_counter() - t
        fsync_tree(self.path(step))
        durable = time.perf_counter() - t
        return {"blocking_s": blocking, "durable_s": durable, "dcp_finished_s": finished}

    def verify(self, step: int) -> bool:
        back = {k: self.torch.empty_like(v, device="cpu") for k, v in self.state.items()}
        self.dcp.load(back, checkpoint_id=self.path(step), no_dist=True)
        return all(same_bits(back[k].numpy(), v.cpu().numpy()) for k, v in self.state.items())

    def remove(self, step: int) -> None:
        shutil.rmtree(self.path(step))

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
        if not self.no_dist:
            import torch.distributed as dist

            dist.destroy_process_group()


class Ckpt(Bench):
    """ckpt itself, through `target/release/ckpt-bench` on the same state
    size, tensor count and directory: `stage` for the math-stop and peak
    RSS, `flush` for save -> durable (crc32c on), in this process's run."""

    packages = ("numpy",)
    notes = "ckpt-bench stage (math-stop, peak RSS) and flush (save -> durable, crc32c on)"

    def __init__(self, spec: Spec, workdir: Path, iters: int):
        root = Path(__file__).resolve().parents[2]
        self.bin = root / "target" / "release" / "ckpt-bench"
        if not self.bin.exists():
            raise FileNotFoundError(f"{self.bin} (cargo build --release -p ckpt-bench)")
        self.args = ["--state-bytes", str(spec.state_bytes), "--tensors", str(spec.tensors),
                     "--iters", str(iters), "--dir", str(workdir), "--json"]

    def run(self, sub: str) -> dict:
        out = subprocess.run([str(self.bin), sub, *self.args], stdout=subprocess.PIPE,
                             text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])


# Floors first, then the tools; torch ones last (optional).
TOOLS = {
    "memcpy_floor": ("memcpy floor", MemcpyFloor),
    "raw_write_floor": ("raw write + fsync floor", RawWriteFloor),
    "safetensors": ("safetensors save_file + fsync", Safetensors),
    "orbax": ("orbax async CheckpointManager", Orbax),
    "ckpt": ("ckpt (ckpt-bench stage + flush)", Ckpt),
    "torch_save": ("torch.save + fsync", TorchSave),
    "torch_dcp": ("torch DCP async_save", TorchDcp),
    "torch_dcp_cached": ("torch DCP, caching stager", TorchDcp),
    "torch_dcp_process": ("torch DCP, process ckptr", TorchDcp),
    "torch_dcp_cuda": ("torch DCP async_save (CUDA)", TorchDcp),
}

# The DCP variants: (device, stager, checkpointer kind).
DCP = {
    "torch_dcp": ("cpu", "default", "thread"),
    "torch_dcp_cached": ("cpu", "cached", "thread"),
    "torch_dcp_process": ("cpu", "default", "process"),
    "torch_dcp_cuda": ("cuda", "default", "thread"),
}


def make_bench(tool: str, spec: Spec, workdir: Path) -> Bench | str:
    """The bench for `tool`, or the reason it is skipped."""
    if tool.startswith("torch"):
        try:
            import torch
        except (ImportError, OSError) as e:
            return f"skipping torch: {e} (peers.sh --with-torch installs it)"
        if tool in DCP:
            device, stager, kind = DCP[tool]
            if device == "cuda" and not torch.cuda.is_available():
                return "skipping torch DCP async_save on CUDA: CUDA is not available"
            try:
                return TorchDcp(spec, workdir, device, stager, kind)
            except Exception as e:  # noqa: BLE001 - a variant this torch lacks
                return f"skipping {tool}: {type(e).__name__}: {e}"
    return TOOLS[tool][1](spec, workdir)


def run_worker(tool: str, spec: Spec, iters: int, workdir: Path) -> dict:
    """Runs one tool in this process: a verified warm-up save, then `iters`
    measured saves. Returns its result, or {"skipped": reason}."""
    workdir.mkdir(parents=True)
    if tool == "ckpt":
        return run_ckpt(spec, iters, workdir)
    bench = make_bench(tool, spec, workdir)
    if isinstance(bench, str):
        return {"skipped": bench}
    try:
        bench.save(0)
        verified = bench.verify(0)
        if verified is False:
            raise RuntimeError(f"{tool}: the warm-up checkpoint does not match the state")
        bench.remove(0)
        reset_peak_rss()
        runs = []
        for step in range(1, iters + 1):
            runs.append(bench.save(step))
            bench.remove(step)
        peak = peak_rss()
    finally:
        bench.close()
    blocking = [r["blocking_s"] for r in runs]
    result = {
        "tool": tool,
        "state_bytes": spec.state_bytes,
        "tensors": spec.tensors,
        "iters": iters,
        "blocking_s": statistics.median(blocking),
        "blocking_min_s": min(blocking),
        "blocking_max_s": max(blocking),
    }
    for key in runs[0]:
        if key != "blocking_s":
            values = [r[key] for r in runs]
            result[key] = None if None in values else statistics.median(values)
    durable = [r["durable_s"] for r in runs if r["durable_s"] is not None]
    result["durable_min_s"] = min(durable, default=None)
    result["durable_max_s"] = max(durable, default=None)
    result["peak_rss_bytes"] = peak
    result["peak_rss_over_state"] = peak / spec.state_bytes
    result["verified"] = verified
    result["notes"] = bench.notes
    result["versions"] = versions(*bench.packages)
    return result


def run_ckpt(spec: Spec, iters: int, workdir: Path) -> dict:
    """ckpt's row, from ckpt-bench's own measurements in this run."""
    try:
        bench = Ckpt(spec, workdir, iters)
    except FileNotFoundError as e:
        return {"skipped": f"skipping ckpt: no {e}"}
    stage = bench.run("stage")
    flush = bench.run("flush")
    return {
        "tool": "ckpt",
        "state_bytes": spec.state_bytes,
        "tensors": spec.tensors,
        "iters": iters,
        "blocking_s": stage["async_math_stop_s"],
        "blocking_min_s": stage.get("async_math_stop_min_s", stage["async_math_stop_s"]),
        "blocking_max_s": stage.get("async_math_stop_max_s", stage["async_math_stop_s"]),
        "durable_s": flush["durable_s"],
        "durable_min_s": None,
        "durable_max_s": None,
        "peak_rss_bytes": stage["peak_rss_bytes"],
        "peak_rss_over_state": stage["peak_rss_bytes"] / spec.state_bytes,
        "verified": None,
        "notes": bench.notes,
        "versions": versions(),
    }


def spawn(tool: str, args: argparse.Namespace, rundir: Path) -> dict:
    """Runs `tool` in a fresh interpreter and returns what its worker printed."""
    cmd = [
        sys.executable, __file__, "--worker", tool,
        "--state-bytes", str(args.state_bytes), "--tensors", str(args.tensors),
        "--iters", str(args.iters), "--dir", str(rundir / tool),
    ]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


ROW = "{:<32} {:>10} {:>8} {:>8} {:>10} {:>7} {:>13} {:>11}"


def seconds(x: float | None) -> str:
    """Seconds for the table, or '-' for none."""
    return "-" if x is None else f"{x:.4f}"


def print_table(results: list, spec: Spec, iters: int, directory: Path) -> None:
    """The human-readable report."""
    print(
        f"peers: {spec.state_bytes / GIB:.2f} GiB in {spec.tensors} tensors, "
        f"{iters} iterations (median) after a warm-up, in {directory}"
    )
    print(ROW.format("", "blocked s", "min", "max", "durable s", "GiB/s", "peak RSS GiB", "peak/state"))
    for r in results:
        to_durable = r["durable_s"] or r["blocking_s"]
        print(ROW.format(
            TOOLS[r["tool"]][0],
            seconds(r["blocking_s"]),
            seconds(r["blocking_min_s"]),
            seconds(r["blocking_max_s"]),
            seconds(r["durable_s"]),
            f"{spec.state_bytes / to_durable / GIB:.2f}",
            f"{r['peak_rss_bytes'] / GIB:.2f}",
            f"{r['peak_rss_over_state']:.2f}",
        ))
    print("GiB/s: state / durable s (/ blocked s for the memcpy floor); "
          "peak RSS: during the measured saves, state included")
    for r in results:
        line = f"  {r['tool']}: {r['notes']}"
        for key in ("orbax_finished_s", "dcp_finished_s"):
            if key in r:
                line += f"; {key.removesuffix('_s').replace('_', ' ')} after {r[key]:.4f} s"
        if r["verified"]:
            line += "; warm-up save read back and matched"
        print(line)
    used = {k: v for r in results for k, v in r["versions"].items()}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(used.items())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-bytes", type=parse_bytes, default=2 * GIB,
                   help="total state size, e.g. 2G, 512M (default 2G)")
    p.add_argument("--tensors", type=int, default=16, help="number of tensors (default 16)")
    p.add_argument("--iters", type=int, default=5,
                   help="measured saves per tool after one warm-up (default 5)")
    p.add_argument("--dir", type=Path, default=Path("target/bench-peers"),
                   help="directory for the checkpoints (default target/bench-peers)")
    p.add_argument("--json", action="store_true", help="one JSON object per result")
    p.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tensors < 1 or args.iters < 1:
        p.error("--tensors and --iters must be at least 1")
    spec = Spec(args.tensors, args.state_bytes // args.tensors // 4 * 4)
    if spec.tensor_bytes == 0:
        p.error("--state-bytes is too small for that many float32 tensors")

    if args.worker:
        print(json.dumps(run_worker(args.worker, spec, args.iters, args.dir)))
        return

    args.dir.mkdir(parents=True, exist_ok=True)
    rundir = args.dir / f"peers-{os.getpid()}"
    results = []
    try:
        for tool in TOOLS:
            r = spawn(tool, args, rundir)
            if "skipped" in r:
                print(r["skipped"], file=sys.stderr)
                if tool == "torch_save":  # no torch: no DCP either
                    print("skipping torch DCP: torch is not installed", file=sys.stderr)
                    break
                continue
            results.append(r)
            if args.json:
                print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    if not args.json:
        print_table(results, spec, args.iters, args.dir)


if __name__ == "__main__":
    main()
