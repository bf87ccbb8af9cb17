"""Where and how fer.py computes: the device, the precision (bfloat16 autocast where
the CPU or GPU has it natively), the processes under torchrun, and what a run
prints (from one process only, and a progress line inside long epochs)."""
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import FerError

# Progress: a terminal's line is redrawn a few times a second; a log gets a line every 30 s.
REDRAW_EVERY, LOG_EVERY = 0.2, 30.0

def log(*args):
    """Print from one process only (rank 0 under torchrun), unbuffered."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype = None  # None: float32
    channels_last: bool = False
    rank: int = 0
    world: int = 1

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def precision(self):
        """The name of what training computes in: the autocast dtype, or float32."""
        return str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "float32"


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FerError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise FerError("--device mps: Apple's MPS backend is not available; use --device cpu or auto")
    return name


def setup_runtime(args, distributed=False):
    """Device, precision and, for `train` under torchrun, the process group."""
    kind = pick_device(args.device)
    world = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
    rank = int(os.environ.get("RANK", 0)) if distributed else 0
    if kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    if kind == "cpu":
        # Processes sharing a CPU split its cores instead of fighting over them
        # (torchrun also sets OMP_NUM_THREADS; an explicit setting wins).
        env_threads = int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
        torch.set_num_threads(args.threads or env_threads or max(1, (os.cpu_count() or 1) // world))
    amp = args.amp if args.amp is not None else kind in ("cuda", "cpu")
    amp_dtype = None
    if amp:
        if kind == "cuda":
            # emulated bf16 (V100, T4) is slow: those get float16 with the grad scaler
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        elif kind == "cpu" and cpu_has_bf16():
            amp_dtype = torch.bfloat16
        elif kind == "mps":
            amp_dtype = torch.float16
    channels_last = args.channels_last if args.channels_last is not None else kind in ("cuda", "cpu")
    return Runtime(device, amp_dtype, channels_last, rank, world)


def cpu_flags():
    """The CPU's feature flags, from Linux's /proc/cpuinfo on x86; None where there are
    none to read (other systems; ARM lists `Features` instead)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def cpu_has_bf16():
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags() or set()))


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return describe_cpu() if device.type == "cpu" else str(device)


def describe_cpu():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


class Progress:
    """Where a long epoch has got to (step, images/s, running loss, time left). On a
    terminal, one line rewritten in place a few times a second; elsewhere (a log file,
    CI), a plain line every LOG_EVERY seconds, so a log shows the run is alive without
    filling up, and nothing for epochs shorter than that."""

    def __init__(self, steps, batch_size, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.on = not dist.is_initialized() or dist.get_rank() == 0
        self.steps, self.batch_size = steps, batch_size
        self.t0 = self.shown = time.time()
        self.width = 0

    def update(self, step, mean_loss):
        now = time.time()
        due = now - self.shown >= (REDRAW_EVERY if self.tty else LOG_EVERY) or (self.tty and step == self.steps)
        if not self.on or not due:
            return
        elapsed, self.shown = now - self.t0, now
        text = (f"  step {step}/{self.steps}  {step * self.batch_size / elapsed:6.0f} img/s  "
                f"loss {mean_loss:.4f}  {elapsed / step * (self.steps - step):4.0f} s left in the epoch")
        if not self.tty:
            self.stream.write(text + "\n")
        else:
            self.width = max(self.width, len(text))
            self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()

    def close(self):
        """Blank the terminal's line, so the epoch's own line is printed on a clean one."""
        if self.on and self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
