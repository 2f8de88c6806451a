"""Inference: batches of preprocessed images in, L2-normalised embeddings (and class probabilities) out."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from common.models import image_size
from common.settings import Settings, available_cores
from worker.allocator import retain_freed_memory
from worker.backbones import Backbone, create_backbone
from worker.dihedral import apply_torch, transforms

log = logging.getLogger(__name__)


class _FeaturesOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def freeze_for_cpu(model: torch.nn.Module, image_size: int) -> torch.nn.Module | None:
    """The model traced and frozen with TorchScript: batch norm folded into the convolutions, and the
    whole forward one call that holds the GIL only to start. In eager mode every operator takes the GIL
    back, so the worker's download threads (which hold it for their Python) stalled the model: a batch
    took 17 times longer beside one busy Python thread (bench/RESULTS.md).

    torch.jit is deprecated in favour of torch.compile, which needs a C++ compiler in the image and
    minutes at every worker start; tracing takes a second. None when the model cannot be traced."""
    example = torch.zeros(2, 3, image_size, image_size)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the deprecation notice, and tracer notes on shape arithmetic
            traced = torch.jit.trace(_FeaturesOnly(model).eval(), example, check_trace=False)
            return torch.jit.freeze(traced.eval())
    except Exception as exc:  # a backbone TorchScript cannot trace still runs, in eager mode
        log.warning("embedder: cannot freeze the model with TorchScript (%s: %s); eager mode", type(exc).__name__, exc)
        return None


def pick_device(requested: str) -> torch.device:
    if requested in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def default_batch_size(device: torch.device, image_size: int, processes: int = 1) -> int:
    """CPU: big enough to amortise per-call overhead. CUDA: scaled to the card's memory at this size, a
    quarter of it shared among the worker processes that use the card."""
    if device.type != "cuda":
        return 32
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    per_image_gib = 3 * image_size * image_size * 4 * 60 / 2**30  # activations ~60x the input, in fp32
    return int(max(32, min(512, total_gib * 0.25 / max(1, processes) / per_image_gib)) // 32 * 32)


class Embedder:
    def __init__(
        self,
        backbone: Backbone,
        device: torch.device,
        image_size: int,
        batch_size: int = 0,
        threads: int = 0,
        torchscript: bool = True,
        processes: int = 1,
        resize_on_device: bool | None = None,
        tta: int = 1,
    ) -> None:
        self.backbone = backbone
        # Test-time augmentation: each particle's embedding is the mean over this many of its dihedral
        # transforms (worker/dihedral.py); the model runs that many times per image.
        self.transforms = transforms(tta)
        self.device = device
        self.image_size = image_size
        self.cuda = device.type == "cuda"
        # On a GPU the host's Python is the bottleneck (bench/RESULTS.md): particles travel at their own
        # size (a 24 px particle is 1/87 of a 224 px input) and are resized in batches on the card.
        self.resize_on_device = self.cuda if resize_on_device is None else resize_on_device
        self._host: torch.Tensor | None = None  # reused staging buffer (pinned on CUDA), grown as needed
        # No cudnn.benchmark: a service sees many batch shapes (partial chunks, a lone interactive task), and
        # autotuning each new one costs more than it saves.
        self.frozen: torch.nn.Module | None = None
        retain_freed_memory()
        if self.cuda:
            self.model = backbone.model.to(device, memory_format=torch.channels_last)
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            torch.set_num_threads(threads or available_cores())
            self.model = backbone.model.to(device)
            self.autocast_dtype = None
            if torchscript:
                self.frozen = freeze_for_cpu(self.model, image_size)
        self.batch_size = batch_size or default_batch_size(device, image_size, processes)
        self.mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
        log.info(
            "embedder: backbone %s on %s (%s), %d px, batch %d, TTA %d%s",
            backbone.name,
            device,
            torch.cuda.get_device_name(device) if self.cuda else f"{torch.get_num_threads()} threads",
            image_size,
            self.batch_size,
            len(self.transforms),
            f", autocast {self.autocast_dtype}, channels_last, pinned memory, resized on the card"
            if self.cuda
            else (", TorchScript (frozen)" if self.frozen is not None else ", eager"),
        )

    def warm_up(self) -> None:
        """One full batch at start-up, so the first real chunk does not pay for lazy initialisation."""
        self.embed([np.zeros((self.image_size, self.image_size, 3), np.uint8)] * self.batch_size)

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """`images`: uint8 (side, side, 3) arrays, run in batches of `batch_size`; side is `image_size`, or
        at most that with `resize_on_device`. Returns the pooled features (n, dim) as float32, not
        normalised, so that the head can still be applied to them."""
        if not len(images):
            return np.zeros((0, self.backbone.embedding_dim), np.float32)
        return np.concatenate(
            [self._forward(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        )

    def _forward(self, images: Sequence[np.ndarray]) -> np.ndarray:
        x, order = self._to_device(images)
        features = self._features(x)
        for transform in self.transforms[1:]:  # one pass per transform: the batch's memory stays as it is
            features += self._features(apply_torch(x, transform))
        if len(self.transforms) > 1:
            features /= len(self.transforms)
        if order is None:
            return features
        unsorted = np.empty_like(features)
        unsorted[order] = features
        return unsorted

    def _features(self, x: torch.Tensor) -> np.ndarray:
        if self.frozen is not None:
            return self.frozen(x).numpy()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out, _ = self.model(x)
        return out.float().cpu().numpy()

    def _to_device(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, np.ndarray | None]:
        """A normalised float batch (n, 3, size, size) on the model's device, and where each of its rows came
        from in `images` (None: in their order).

        Particles at their own size are sorted by side, so that each side's images lie one after the other
        in the transfer and reach the batch as one slice: the batch is built from views and one resize per
        side, with no index tensor to send. Sending one (a small copy from pageable memory) waits for
        everything queued on the card, once per side, about 50 times a batch."""
        if not self.resize_on_device and not self.cuda:
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
            return (x - self.mean) / self.std, None
        sides = np.array([img.shape[0] for img in images])
        order = np.argsort(sides, kind="stable")
        flat = self._stage([images[i] for i in order])
        size = self.image_size
        x = torch.empty((len(images), 3, size, size), device=self.device)
        row = offset = 0
        for side, count in zip(*np.unique(sides[order], return_counts=True), strict=True):
            side, count = int(side), int(count)
            length = count * side * side * 3
            group = flat[offset : offset + length].view(count, side, side, 3).permute(0, 3, 1, 2).float()
            if side != size:
                group = torch.nn.functional.interpolate(
                    group, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size
                )
            x[row : row + count] = group
            row, offset = row + count, offset + length
        x = x.div_(255.0).sub_(self.mean).div_(self.std)
        x = x.contiguous(memory_format=torch.channels_last) if self.cuda else x
        return x, None if bool((np.diff(order) == 1).all()) else order

    def _stage(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The images' bytes, one after the other, copied in one transfer to the device. The host buffer
        is kept: pinning memory is a system call and a page-locking of the whole buffer, too dear to pay per
        batch. Reusing it is safe because every batch ends in a synchronising copy of its features back to
        the host, so no transfer from it is still running when the next batch fills it."""
        total = sum(img.size for img in images)
        if self._host is None or self._host.numel() < total:
            capacity = max(total, self.batch_size * 3 * self.image_size**2)
            self._host = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.cuda)
        host = self._host[:total]
        np.concatenate([np.ascontiguousarray(img, np.uint8).reshape(-1) for img in images], out=host.numpy())
        return host.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def head_probabilities(self, features: np.ndarray) -> np.ndarray | None:
        """Class probabilities from stored features (None for a backbone without a useful head)."""
        head = self.backbone.model.head
        if head is None or not len(features):
            return None
        weight = head.weight.detach().float().cpu()
        bias = head.bias.detach().float().cpu()
        logits = torch.from_numpy(np.asarray(features, np.float32)) @ weight.T + bias
        return torch.softmax(logits, dim=1).numpy()


def embedder_from_settings(settings: Settings, batch_size: int | None = None) -> Embedder:
    """The embedder a worker process runs (`batch_size` overrides BATCH_SIZE, for a benchmark)."""
    return Embedder(
        create_backbone(settings.backbone, settings.weights or None),
        pick_device(settings.device),
        image_size(settings),
        settings.batch_size if batch_size is None else batch_size,
        threads=settings.threads_per_process(),
        torchscript=settings.torchscript,
        processes=settings.worker_concurrency,
        tta=settings.tta,
    )
