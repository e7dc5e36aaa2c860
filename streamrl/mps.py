"""NVIDIA MPS for a job whose trainer and engines share a GPU (`--use-mps`).

Without MPS, kernels of different processes on one GPU never run at the same time: the card time-slices between
their contexts, so an engine decoding next to a training step only takes turns with it. Under MPS the processes
share one context on the device and their kernels run side by side (decode is memory-bound, a training step
mostly compute-bound). `scripts/gpu/overlap_probe.py` measures the difference.

The daemon is private to the job (its own pipe and log directories, passed to every process through
CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY) and is stopped at shutdown; the card's compute mode and other
settings are not touched. It must start before any process of the job creates a CUDA context.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile


class MpsDaemon:
    def __init__(self) -> None:
        exe = shutil.which("nvidia-cuda-mps-control")
        if exe is None:
            raise RuntimeError("--use-mps: nvidia-cuda-mps-control is not on PATH (it ships with the NVIDIA driver)")
        self.exe, self.dir = exe, tempfile.mkdtemp(prefix="streamrl-mps-")
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(self.dir, "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": os.path.join(self.dir, "log")}
        for d in self.env.values():
            os.makedirs(d)
        r = subprocess.run([exe, "-d"], env={**os.environ, **self.env}, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"--use-mps: `nvidia-cuda-mps-control -d` failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[:300]}")
        self.running = True
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.running:
            self.running = False
            try:
                subprocess.run([self.exe], input="quit\n", env={**os.environ, **self.env}, capture_output=True,
                               text=True, timeout=30)
            except subprocess.TimeoutExpired:  # clients still attached: say so instead of hanging the shutdown
                print(f"[streamrl] MPS daemon ({self.dir}) did not quit within 30 s", flush=True)
            shutil.rmtree(self.dir, ignore_errors=True)
