"""What every benchmark records and runs on: synthetic pairs and the machine it ran on."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from clipib.models.split import SplitCLIP

CAPTIONS = ["a photo of a dog", "two cats sleeping on a red sofa", "a man riding a horse on the beach",
            "a bowl of fruit", "a city street at night with cars and people", "a small boat on a lake"]
"""Captions of 6-11 tokens (SOT..EOT), cycled by :func:`synthetic_pairs`."""


def synthetic_pairs(clip: SplitCLIP, n: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``n`` pairs on the model's device: standard-normal images ``[n, 3, H, W]`` and captions of 6-11
    tokens (SOT..EOT), cycling."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *clip.image_size, generator=gen).to(clip.device)  # [n, 3, H, W]
    return images, clip.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(n)])  # [n, ctx]


def load_average() -> List[float]:
    """The 1, 5 and 15 minute load averages, rounded to 2 digits."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(device: torch.device) -> Dict[str, Any]:
    """Where and when the benchmark ran: host, CPU count, torch threads, load average, device name, date."""
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device), "load_average_1_5_15": load_average()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info
