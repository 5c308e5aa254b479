"""Performance harness: certification against the limit set by g, through the library and the
pipeline, for scalecert and the masking baseline, in one run on the same images and machine.

By default: CIFAR ResNet-20, 5 px patches (2.4%), 6 x 6 masks, SIN top-k of ``--top-k``
(default: the recommended scalecert checkpoint's), on the first ``--images / 10``
CIFAR-10 test JPEGs of each class (a class-folder subset on disk). Each method certifies the
model fine-tuned for it (its recommended checkpoint in ``models/best.json``, see ``models/README.md``):
how much work avoidance saves depends on how many images certify, so an undefended model would
misstate it. g runs as the pipeline runs it on a CPU, BatchNorm folded (``--no-fuse-bn``: not).

Any model (``--model SPEC``, as ``scalecert certify`` takes it: a built-in name,
``file:PATH.py:CALLABLE``, ``module:...``, ``export:PATH.pt2``, ...), with its preprocessing
(``--input-size --resize --interpolation --mean --std``, same meaning as on the CLI), one
``--checkpoint`` for both methods (default: the weights the spec builds; for cifar_resnet20 the
recommended checkpoints), ``--patch`` in px or % of the image area (default 2.4%) and ``--data``,
a class-folder image set (``<class>/<file>``; ImageNet: ``<synset>/<file>`` with ``--synsets``,
the sorted 1000-synset file, labels mapped as the pipeline maps them). The images are the first
``--images / C`` files of each of its C class folders (at least one each), then the first
``--images`` of those; they are decoded with the model's preprocessing, as the pipeline decodes
them. E.g. EfficientNet-Lite0 on the ImageNet sample (``--limit-images`` and
``--warmup-images`` keep a slow model's run short)::

    python bench/harness.py --model file:examples/efficientnet_lite0.py:build --input-size 224 \
        --resize 256 --interpolation bicubic --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \
        --patch 2% --data DIR --synsets synsets.txt --images 40 --shard-size 10 \
        --limit-batches --limit-images 64 --warmup-images 1

Refused before any work, with the reason: ``--checkpoint`` beside a per-method checkpoint, a
built-in other than cifar_resnet20 without a checkpoint (random weights), ``--synsets`` without
``--data``, a patch that does not fit the input, an image set whose class count is not the
model's, and whatever ``scalecert certify`` refuses of the spec and its preprocessing.

  limit      images/s of g alone at ``--batch-size``: scalecert's head on pruned stem outputs,
             masking's whole model on occluded images
  library    ``Certifier.certify``: images/s and g runs per image (1 + evaluated masks), with the
             full per-mask map and with work avoidance (``full_map=False``), for both methods
  pipeline   scalecert through ``pipeline.certify.driver.run_certification`` on the JPEG
             folder (work avoidance): Pillow decode, local Ray actors, Parquet. Ray's own
             start-up is measured apart and excluded; "end to end" covers planning, actor
             start, every shard and the read-back, "in shards" the span from the first shard's
             start to the last shard's end. ``--pipeline-images N`` runs it on more images (the first N / 10 of
             each class), so that its fixed costs weigh as in a real run
  scale-out  (``--scale-out 1 2 4``) the pipeline with that many CPU workers sharing the cores,
             on shards of ``--scale-shard-size`` images

Ratios:
  library efficiency    images/s x g runs per image / g's images/s at the same batch size
                        (DESIGN's definition; 1.0: nothing but g costs time; the vanilla
                        forward and recoveries count as overhead). Also against g at its
                        fastest batch size, and "in g": the share of the wall time spent inside
                        g's forward calls (forward hooks; recoveries included)
  pipeline efficiency   pipeline images/s x g runs per image / g's images/s, and pipeline
                        images/s / library images/s (work avoidance)
  speed-up              scalecert images/s / masking images/s, same mode
  vs bound              g runs per image / (1 + needed masks of certified images only): the
                        issue's lower bound, which leaves clean_output of the other images open
  vs oracle             g runs per image / what an oracle that knew each image's first
                        disagreeing mask would run while keeping clean_output exact (one mask
                        for an image with a disagreement, every needed mask otherwise)
  parallel efficiency   speed-up over 1 worker / the share of the machine's cores used, relative
                        to 1 worker (CPU workers share the cores: ideal is the same throughput)

    python bench/harness.py [--images 2000] [--pipeline-images 10000] [--batch-size 64] [--json PATH]
                            [--scale-out 1 2 4] [--no-pipeline] [--limit-batches 32 ...]
                            [--model SPEC [--input-size N --resize N --interpolation I --mean R,G,B
                             --std R,G,B] --checkpoint PATH --patch 2% --data DIR --synsets FILE]

Writes every figure as JSON (default ``bench/results/harness-<commit>.json``, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cifar10_folder  # noqa: E402

from pipeline.certify.driver import run_certification  # noqa: E402
from pipeline.compute.batches import to_batch  # noqa: E402
from pipeline.compute.cluster import cpu_threads, init_ray  # noqa: E402
from pipeline.compute.models import as_flag_message, check_model_options  # noqa: E402
from pipeline.io.images import Preprocess, read_labelled  # noqa: E402
from pipeline.io.recommended import read_recommendations  # noqa: E402
from pipeline.io.sources import IMAGENET_CLASSES, is_image_key, open_dataset  # noqa: E402
from pipeline.options import PatchSize  # noqa: E402
from pipeline.run.config import RunConfig  # noqa: E402
from pipeline.run.worker import ShardSummary  # noqa: E402
from scalecert import CertConfig, Certifier, CertifyResult, load_model  # noqa: E402
from scalecert.certify import NOT_EVALUATED  # noqa: E402
from scalecert.errors import Refusal  # noqa: E402
from scalecert.models import Preprocessing, parse_spec  # noqa: E402
from scalecert.precision import FastPath  # noqa: E402

METHODS = ("scalecert", "masking")
DEFAULT_MODEL = "cifar_resnet20"  # the model of the recommended checkpoints
DEFAULT_PATCH = "2.4%"  # 5 px on CIFAR's 32 px
OUTCOMES = ("prediction", "certified", "clean_output", "alert_box", "recovered_prediction")


@dataclass(frozen=True)
class Setup:
    """What every measurement of one harness run shares."""

    images: int
    patch_px: int
    top_k: float
    masks_per_axis: int
    batch_size: int
    threads: int
    cores: int
    fuse_bn: bool
    checkpoints: dict[str, str]  # method -> weights
    commit: str

    def cert_config(self, method: str) -> CertConfig:
        return CertConfig(patch_px=self.patch_px, top_k=self.top_k,
                          masks_per_axis=self.masks_per_axis, method=method)

    def certifier(self, model: torch.nn.Module, method: str, full_map: bool = True) -> Certifier:
        """The library certifier, with g run as the pipeline runs it on a CPU."""
        return Certifier(model, self.cert_config(method), batch_size=self.batch_size,
                         full_map=full_map, fast=FastPath(fuse_bn=self.fuse_bn))


class HarnessRefusal(SystemExit):
    """A combination the harness cannot honour, refused before any work."""

    def __init__(self, message: str) -> None:
        super().__init__(f"harness: {message}")


@dataclass(frozen=True)
class ModelChoice:
    """The model a harness run measures: its spec, the preprocessing the user declared (None
    fields: the model's own), the patch as given and the synsets file of the labels."""

    spec: str
    declared: Preprocessing
    patch: str
    synsets: str | None = None

    @property
    def is_default(self) -> bool:
        return self.spec == DEFAULT_MODEL

    def load(self, checkpoint: str | None) -> torch.nn.Module:
        declared = self.declared if self.declared.declared() else None
        return load_model(self.spec, checkpoint=checkpoint, preprocessing=declared)


@dataclass(frozen=True)
class Throughput:
    """One certification measurement: images/s and g runs per image."""

    images_per_s: float
    g_runs_per_image: float
    wall_s: float
    time_in_g: float  # share of the wall time inside g's forward calls (incl. recoveries)
    g_calls: int


def commit_id() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files differ from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    head = git("rev-parse", "--short=10", "HEAD").stdout.strip() or "unknown"
    return head + ("+dirty" if git("diff", "--quiet", "HEAD").returncode else "")


def g_module(certifier: Certifier) -> torch.nn.Module:
    """The network g whose runs certification counts, as the certifier runs it (BatchNorm
    folded unless ``--no-fuse-bn``): scalecert's head after the superficial layer, or the whole
    model for masking (which occludes pixels)."""
    return certifier.runner.g_fast


def limit_repeats(batch_size: int, images: int | None) -> int:
    """Runs of g per timing trial at ``batch_size``: about ``images`` images of g (at least
    one run), or by default 4096 images and at least four runs."""
    if images is None:
        return max(4, 4096 // batch_size)
    return max(1, math.ceil(images / batch_size))


def g_limit(
    certifier: Certifier, images: torch.Tensor, batch_size: int, repeats: int, trials: int = 5
) -> float:
    """Images/s of g alone at ``batch_size``, on inputs exactly as certification builds them
    (the predictor's ``g_inputs`` under windows of the family: scalecert's pruned stem
    outputs, masking's occluded images). The best of ``trials`` timings of ``repeats`` runs (a
    busy machine only slows g down)."""
    predictor = certifier.predictor
    rows = torch.arange(batch_size)
    with torch.inference_mode():
        batch = predictor.prepare(images[:batch_size])
        boxes = certifier.mask_boxes(images.shape[2], images.shape[3])
        inputs = predictor.g_inputs(batch, rows % len(batch), boxes[rows % len(boxes)])
        g = g_module(certifier)
        g(inputs)  # warm-up
        best = float("inf")
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(repeats):
                g(inputs)
            best = min(best, time.perf_counter() - start)
        return repeats * batch_size / best


class TimeInside:
    """Wall time spent inside a module's forward calls, from forward hooks (CPU: no device
    synchronisation needed). Used as ``with TimeInside(g) as timer: ...; timer.seconds``."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.seconds = 0.0
        self.calls = 0
        self._started: list[float] = []
        self._hooks: list[Any] = []

    def __enter__(self) -> "TimeInside":
        self._hooks = [
            self.module.register_forward_pre_hook(
                lambda *_: self._started.append(time.perf_counter())),
            self.module.register_forward_hook(lambda *_: self._stop()),
        ]
        return self

    def _stop(self) -> None:
        self.seconds += time.perf_counter() - self._started.pop()
        self.calls += 1

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()


def certify_timed(
    model: torch.nn.Module, setup: Setup, method: str, full_map: bool,
    images: torch.Tensor, labels: torch.Tensor, warmup: int = 32,
) -> tuple[CertifyResult, Throughput]:
    certifier = setup.certifier(model, method, full_map)
    certifier.certify(images[:warmup], labels[:warmup])  # warm-up
    with TimeInside(g_module(certifier)) as in_g:
        start = time.perf_counter()
        result = certifier.certify(images, labels)
        seconds = time.perf_counter() - start
    forwards = 1 + float(result.n_evaluated.float().mean())
    return result, Throughput(len(images) / seconds, forwards, seconds,
                              time_in_g=in_g.seconds / seconds, g_calls=in_g.calls)


def lower_bound(full: CertifyResult) -> float:
    """g runs per image any exact method needs for the certificates: M(x) for every image,
    and every needed mask of the certified ones (their certificate needs them all)."""
    return 1 + float((full.n_evaluated * full.certified).float().mean())


def oracle_bound(full: CertifyResult) -> float:
    """g runs per image of an oracle schedule that also keeps ``clean_output`` exact (the
    false-alert rate counts it on every image): M(x); every needed mask of an image with no
    disagreeing mask (the certified ones, and those whose wrong M(x) no window changes); one
    mask, the first disagreeing one, for every other image."""
    needed = full.mask_predictions != NOT_EVALUATED
    disagrees = (needed & (full.mask_predictions != full.prediction[:, None])).any(dim=1)
    masks = torch.where(disagrees, torch.ones_like(full.n_evaluated), full.n_evaluated)
    return 1 + float(masks.float().mean())


@dataclass(frozen=True)
class PipelineRun:
    workers: int
    shard_size: int
    shards: int
    images_per_s: float  # end to end (Ray already started)
    busy_images_per_s: float  # images / (last shard's end - first shard's start)
    g_runs_per_image: float
    g_runs_lower_bound: float  # 1 + needed masks of its certified images (they run them all)
    wall_s: float
    fixed_s: float  # end to end minus the shards' span: plan, actor start, read-back
    outcomes_match_library: bool  # on the library's images


def run_pipeline(
    setup: Setup, choice: ModelChoice, data: Path, out: Path, workers: int, shard_size: int,
    library: CertifyResult, image_ids: list[str],
) -> PipelineRun:
    """One scalecert run of the Ray pipeline (work avoidance) on the image folder ``data``, which
    holds at least the library's images ``image_ids`` (outcomes are compared on those), with
    the model and preprocessing of ``choice``."""
    run = RunConfig(
        data=str(data), model=choice.spec, out=str(out), patches=(str(setup.patch_px),),
        checkpoint=setup.checkpoints["scalecert"], methods=("scalecert",), top_k=setup.top_k,
        masks_per_axis=setup.masks_per_axis, shard_size=shard_size, resume=False,
        workers=workers, device="cpu", batch_size=setup.batch_size, fuse_bn=setup.fuse_bn,
        synsets=choice.synsets, **choice.declared.declared(),
    )
    shards: list[ShardSummary] = []
    summary = run_certification(run, progress=shards.append)
    busy = (max(shard.finished_at for shard in shards)
            - min(shard.started_at for shard in shards))
    table = summary.table.to_pydict()
    row_of = {image_id: i for i, image_id in enumerate(table["image_id"])}
    rows = [row_of[image_id] for image_id in image_ids]
    same = all([table[name][i] for i in rows] == getattr(library, name).tolist()
               for name in ("prediction", "certified", "clean_output"))
    evaluated = sum(table["n_evaluated"]) / len(table["n_evaluated"])
    certified_masks = sum(n for n, ok in zip(table["n_evaluated"], table["certified"]) if ok)
    return PipelineRun(
        workers=workers, shard_size=shard_size, shards=len(shards),
        images_per_s=summary.images_run / summary.wall_s,
        busy_images_per_s=summary.images_run / busy, g_runs_per_image=1 + evaluated,
        g_runs_lower_bound=1 + certified_masks / len(table["n_evaluated"]),
        wall_s=summary.wall_s, fixed_s=summary.wall_s - busy, outcomes_match_library=same,
    )


def image_subset(source: Path, count: int) -> Path:
    """A temporary copy of the first ``count`` images of the class folders under ``source``:
    the first ``count / C`` image files (sorted) of each of its C class folders (sorted), at
    least one each, then the first ``count`` of those. On ten classes this is the first
    ``count / 10`` of each, as for CIFAR-10; on ImageNet's one-photo folders, the first
    ``count`` folders."""
    folders = sorted(p for p in source.iterdir() if p.is_dir())
    if not folders:
        raise HarnessRefusal(f"--data: no class folders under {source} (expected "
                             "<class>/<image>)")
    per_class = max(1, count // len(folders))
    chosen = [path for folder in folders
              for path in sorted(p for p in folder.iterdir()
                                 if p.is_file() and is_image_key(p.name))[:per_class]][:count]
    if not chosen:
        raise HarnessRefusal(f"--data: no image files in the class folders of {source}")
    target = Path(tempfile.mkdtemp(prefix="scalecert-bench-")) / source.name
    for path in chosen:
        (target / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.parent.name / path.name)
    return target


def load_images(
    folder: Path, model: torch.nn.Module, synsets: str | None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images, labels, image_ids)`` of the class folder ``folder``, listed, labelled and
    decoded as the pipeline's workers do it: :func:`~pipeline.io.sources.open_dataset` (class
    index = sorted folder names, or the line of the folder's synset in ``synsets``), then
    :func:`~pipeline.io.images.read_labelled` with the model's resolved preprocessing. Refused
    when the labels cannot be the model's classes or an image cannot be used."""
    try:
        dataset = open_dataset(str(folder), synsets=synsets)
    except Refusal as exc:
        raise HarnessRefusal(f"--data: {exc}") from None
    num_classes = int(model.num_classes)
    if synsets is not None and len(dataset.classes) != num_classes:
        raise HarnessRefusal(f"--synsets: {synsets} lists {len(dataset.classes)} classes, but "
                             f"the model has {num_classes}: its labels would not be the "
                             "model's classes")
    if synsets is None and len(dataset.classes) != num_classes:
        hint = (" (ImageNet <synset>/<file> folders: pass --synsets FILE, the sorted 1000 "
                "synsets)" if num_classes == IMAGENET_CLASSES else "")
        raise HarnessRefusal(
            f"--data: the {len(dataset.records)} images chosen lie in {len(dataset.classes)} "
            f"class folders, labelled by their sorted names, but the model has {num_classes} "
            f"classes: the labels would not be the model's{hint}")
    preprocess = Preprocess.of(model.preprocessing)
    arrays = []
    for record in dataset.records:
        outcome = read_labelled(record, preprocess, num_classes=num_classes)
        if outcome.pixels is None:
            raise HarnessRefusal(f"--data: {record.location}: {outcome.reason}")
        arrays.append(outcome.pixels)
    labels = torch.tensor([record.label for record in dataset.records], dtype=torch.int64)
    return to_batch(arrays), labels, [record.image_id for record in dataset.records]


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row]
                        for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for row in cells:
        print("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))))


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000,
                        help="test images: the first IMAGES / C of each of the C class folders "
                             "(at least one each), then the first IMAGES of those (CIFAR-10: "
                             "a multiple of 10)")
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC",
                        help="model spec, as `scalecert certify --model` takes it: a built-in "
                             "name, file:PATH.py:CALLABLE, module:IMPORT.PATH:CALLABLE, "
                             f"export:PATH.pt2, torchvision:NAME, timm:NAME (default: "
                             f"{DEFAULT_MODEL})")
    parser.add_argument("--input-size", type=int,
                        help="square side the model takes, in px (required for file:, "
                             "module: and export: models)")
    parser.add_argument("--resize", type=int,
                        help="resize the short side to this many px, then centre-crop "
                             "--input-size (default: no resize)")
    parser.add_argument("--interpolation", choices=["bilinear", "bicubic"],
                        help="filter of --resize (default bilinear)")
    parser.add_argument("--mean", help="per-channel mean R,G,B the model expects (not for "
                        "built-ins)")
    parser.add_argument("--std", help="per-channel std R,G,B, with --mean")
    parser.add_argument("--checkpoint", type=Path,
                        help="one state_dict for both methods (default: the weights the spec "
                             f"builds; for {DEFAULT_MODEL} each method's recommended checkpoint)")
    parser.add_argument("--patch", default=DEFAULT_PATCH,
                        help="patch side in px (5) or share of the image area (2%%); default "
                             f"{DEFAULT_PATCH.replace('%', '%%')}, 5 px on CIFAR's 32 px")
    parser.add_argument("--synsets",
                        help="ImageNet: the file of the 1000 synsets (sorted order = class "
                             "index) labelling --data's <synset>/<file> folders, as "
                             "`scalecert certify --synsets`")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="(image, mask) pairs per run of g (default: the pipeline's on a CPU)")
    parser.add_argument("--limit-batches", type=int, nargs="*", default=[32, 128, 256, 512],
                        metavar="N", help="also time g alone at these batch sizes (the curve; "
                        "on a CPU small batches can beat large ones, caches)")
    parser.add_argument("--limit-images", type=int, metavar="N",
                        help="images of g per timing of g alone (best of 5 timings; default "
                             "4096, at least four runs of g): fewer for a slow model")
    parser.add_argument("--warmup-images", type=int, default=32, metavar="N",
                        help="images certified before each timed certification (32)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the library runs (default: every core)")
    recommended = read_recommendations()
    for method in METHODS:
        parser.add_argument(f"--{method}-checkpoint", type=Path,
                            help=f"the model's weights certified with {method} (default for "
                                 f"{DEFAULT_MODEL}: its recommended checkpoint, "
                                 "models/best.json)")
    parser.add_argument("--top-k", type=float,
                        help=f"SIN top-k of scalecert (default for {DEFAULT_MODEL}: the one its "
                             "recommended checkpoint is certified with; else the pipeline's, "
                             f"{RunConfig.__dataclass_fields__['top_k'].default})")
    parser.add_argument("--data", type=Path,
                        help="class-folder image set, <class>/<image> (default: the shared "
                             "CIFAR-10 test JPEGs)")
    parser.add_argument("--shard-size", type=int, default=256, help="images per pipeline shard")
    parser.add_argument("--pipeline-images", type=int,
                        help="run the main pipeline measurement on this many images (a superset "
                             "of --images; default: the same images): a longer run, whose fixed "
                             "costs weigh as they do in real runs")
    parser.add_argument("--no-pipeline", action="store_true", help="library figures only")
    parser.add_argument("--no-fuse-bn", action="store_true",
                        help="run g with its BatchNorms (the pipeline's --no-fuse-bn); by "
                             "default g runs folded, as the pipeline runs it")
    parser.add_argument("--scale-out", type=int, nargs="*", default=[], metavar="WORKERS",
                        help="also run the pipeline with these worker counts (e.g. 1 2 4)")
    parser.add_argument("--scale-shard-size", type=int,
                        help="images per shard of the scale-out runs (default: enough shards "
                             "for two per worker of the largest count)")
    parser.add_argument("--json", type=Path, help="figures as JSON (default: "
                        "bench/results/harness-<commit>.json)")
    args = parser.parse_args()

    choice, checkpoints, top_k = check_options(args, recommended)
    torch.set_num_threads(args.threads)
    try:
        models: dict[str, torch.nn.Module] = {}
        for method in METHODS:  # one model per distinct checkpoint
            same = next((m for m in models if checkpoints[m] == checkpoints[method]), None)
            models[method] = (models[same] if same is not None
                              else choice.load(checkpoints[method]))
    except Refusal as exc:
        raise HarnessRefusal(as_flag_message(exc)) from None
    side = int(models["scalecert"].preprocessing.input_size)
    patch_px = PatchSize.parse(choice.patch).pixels(side)
    if patch_px >= side:
        raise HarnessRefusal(f"--patch: {choice.patch} is {patch_px} px, not smaller than the "
                             f"model's {side} px input")
    per_class = max(1, args.images // 10)
    data = (cifar10_folder("test", per_class) if args.data is None
            else image_subset(args.data, args.images))
    images, labels, ids = load_images(data, models["scalecert"], choice.synsets)
    setup = Setup(images=len(images), patch_px=patch_px, top_k=top_k, masks_per_axis=6,
                  batch_size=args.batch_size, threads=args.threads, cores=os.cpu_count() or 1,
                  fuse_bn=not args.no_fuse_bn, checkpoints=checkpoints, commit=commit_id())
    figures: dict[str, Any] = {"setup": asdict(setup), "limit": {}, "limit_by_batch": {},
                               "library": {}}
    model_text = choice.spec
    if not choice.is_default:
        model = models["scalecert"]
        figures["model"] = {
            "spec": choice.spec, "patch": choice.patch,
            "preprocessing": model.preprocessing.declared(),
            "data": str(args.data) if args.data is not None else None,
            "synsets": choice.synsets,
            "source_sha256": getattr(model, "source_sha256", None),
            "package_versions": dict(getattr(model, "package_versions", None) or {}),
            "limit_images": args.limit_images, "warmup_images": args.warmup_images,
        }
        model_text += f" ({model.preprocessing.describe()})"
    print(f"harness at {setup.commit}: {model_text}, {setup.patch_px} px patches, "
          f"{setup.masks_per_axis}x{setup.masks_per_axis} masks, top-k {setup.top_k}, "
          f"{setup.images} images, batch {setup.batch_size}, {setup.threads} threads, "
          f"{setup.cores} cores")

    # (a) the limit, (b) and (d) the library, full map and work avoidance, both methods
    results: dict[tuple[str, str], CertifyResult] = {}
    library_rows = []
    for method in METHODS:
        model = models[method]
        certifier = setup.certifier(model, method)
        curve = {size: g_limit(certifier, images, size,
                               repeats=limit_repeats(size, args.limit_images))
                 for size in sorted({setup.batch_size, *args.limit_batches})}
        limit = curve[setup.batch_size]
        figures["limit"][method] = round(limit, 1)
        figures["limit_by_batch"][method] = {str(k): round(v, 1) for k, v in curve.items()}
        for mode, full_map in (("full_map", True), ("avoid", False)):
            result, measured = certify_timed(model, setup, method, full_map, images, labels,
                                             warmup=args.warmup_images)
            results[method, mode] = result
            figures["library"][f"{method}.{mode}"] = {
                **{k: round(v, 3) for k, v in asdict(measured).items()},
                "efficiency": ratio(measured.images_per_s * measured.g_runs_per_image, limit),
                "efficiency_vs_best_batch": ratio(
                    measured.images_per_s * measured.g_runs_per_image, max(curve.values())),
            }
        full, lean = results[method, "full_map"], results[method, "avoid"]
        bound = lower_bound(full)
        oracle = oracle_bound(full)
        figures["library"][method] = {
            "g_runs_lower_bound": round(bound, 3),
            "g_runs_oracle_bound": round(oracle, 3),
            "outcomes_identical": all(torch.equal(getattr(full, name), getattr(lean, name))
                                      for name in OUTCOMES),
            "certified_accuracy": round(float(full.certified.float().mean()), 4),
            "accuracy": round(float((full.prediction == labels).float().mean()), 4),
            # the vanilla forward (scalecert; masking's M(x) is its undefended model); with
            # r = 1 a recovery is the located window's prediction, already run
            "extra_runs_per_image": int(method == "scalecert"),
            "located_alerts_per_image": round(
                float((lean.recovered_prediction >= 0).float().mean()), 3),
        }
        for mode in ("full_map", "avoid"):
            entry = figures["library"][f"{method}.{mode}"]
            entry["vs_lower_bound"] = ratio(entry["g_runs_per_image"], bound)
            entry["vs_oracle_bound"] = ratio(entry["g_runs_per_image"], oracle)
            library_rows.append([f"{method} library {mode}", entry["images_per_s"],
                                 entry["g_runs_per_image"], entry["vs_lower_bound"],
                                 entry["vs_oracle_bound"], entry["efficiency"],
                                 entry["time_in_g"], entry["wall_s"]])

    # (c) the pipeline, and the scale-out runs
    pipeline_rows, scale_rows = [], []
    if not args.no_pipeline:
        lean = results["scalecert", "avoid"]
        pipeline_data = data
        if args.pipeline_images and args.pipeline_images > setup.images:
            more = args.pipeline_images // 10
            pipeline_data = (cifar10_folder("test", more) if args.data is None
                             else image_subset(args.data, args.pipeline_images))
        started = time.perf_counter()
        owned = init_ray(None)
        figures["ray_start_s"] = round(time.perf_counter() - started, 2)
        try:
            with tempfile.TemporaryDirectory(prefix="scalecert-harness-") as scratch:
                main_run = run_pipeline(setup, choice, pipeline_data,
                                        Path(scratch) / "pipeline", 1, args.shard_size, lean,
                                        ids)
                figures["pipeline"] = asdict(main_run)
                scale_shard = args.scale_shard_size or max(
                    1, math.ceil(setup.images / (2 * max(args.scale_out, default=1))))
                figures["scale_out"] = [
                    asdict(run_pipeline(setup, choice, data, Path(scratch) / f"scale-{n}", n,
                                        scale_shard, lean, ids))
                    for n in args.scale_out
                ]
        finally:
            if owned:
                import ray

                ray.shutdown()
        limit, library_rate = figures["limit"]["scalecert"], figures["library"][
            "scalecert.avoid"]["images_per_s"]
        same_images = pipeline_data == data
        oracle = figures["library"]["scalecert"]["g_runs_oracle_bound"]
        for label, rate in (("end to end", main_run.images_per_s),
                            ("in shards", main_run.busy_images_per_s)):
            pipeline_rows.append([f"scalecert pipeline {label}", rate, main_run.g_runs_per_image,
                                  ratio(main_run.g_runs_per_image,
                                        main_run.g_runs_lower_bound),
                                  ratio(main_run.g_runs_per_image, oracle) if same_images
                                  else "-",
                                  ratio(rate * main_run.g_runs_per_image, limit), "-",
                                  main_run.wall_s if label == "end to end" else
                                  main_run.wall_s - main_run.fixed_s])
        figures["pipeline"].update({
            "efficiency_vs_library": ratio(main_run.images_per_s, library_rate),
            "busy_efficiency_vs_library": ratio(main_run.busy_images_per_s, library_rate),
            "efficiency_vs_limit": ratio(main_run.images_per_s * main_run.g_runs_per_image,
                                         limit),
        })
        scale_rows = scale_out_rows(figures["scale_out"], setup.cores)

    print_table("certification (g runs: 1 + evaluated masks per image)",
                ["", "images/s", "g runs/img", "vs bound", "vs oracle", "efficiency", "in g",
                 "wall s"],
                library_rows + pipeline_rows)
    summary = summary_rows(figures)
    figures["ratios"] = {name: value for name, value, _ in summary}
    print_table("ratios", ["", "value", "target"], [list(row) for row in summary])
    sizes = list(figures["limit_by_batch"]["scalecert"])
    print_table("g alone, images/s by batch size", ["", *sizes],
                [[method, *figures["limit_by_batch"][method].values()] for method in METHODS])
    if scale_rows:
        print_table(f"scale-out (shards of {figures['scale_out'][0]['shard_size']} images)",
                    ["workers", "threads each", "images/s", "in shards", "g runs/img",
                     "speed-up", "parallel eff.", "fixed s"], scale_rows)

    target = args.json or REPO / "bench" / "results" / f"harness-{setup.commit}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nfigures written to {target}")


def check_options(
    args: argparse.Namespace, recommended: dict[str, Any]
) -> tuple[ModelChoice, dict[str, str | None], float]:
    """The model, each method's checkpoint (absolute path, or None: the spec's own weights)
    and the top-k of a run; a :class:`HarnessRefusal` for a combination the harness cannot
    honour, before anything is loaded."""
    try:
        declared = check_model_options(args)  # the spec and its preprocessing, as certify
        PatchSize.parse(args.patch)
    except Refusal as exc:
        text = str(exc)
        raise HarnessRefusal(text if text.startswith("--") else f"--{text}") from None
    choice = ModelChoice(spec=args.model, declared=declared, patch=args.patch,
                         synsets=args.synsets)
    per_method = {method: getattr(args, f"{method}_checkpoint") for method in METHODS}
    given = [f"--{method}-checkpoint" for method in METHODS if per_method[method] is not None]
    if args.checkpoint is not None and given:
        raise HarnessRefusal(f"--checkpoint (one state_dict for both methods) cannot go with "
                             f"{' and '.join(given)}; give one or the other")
    checkpoints: dict[str, str | None] = {}
    for method in METHODS:
        path = per_method[method] or args.checkpoint
        if path is None and choice.is_default:
            path = recommended[method].path()
        if path is not None and not Path(path).is_file():
            flag = f"--{method}-checkpoint" if per_method[method] else "--checkpoint"
            raise HarnessRefusal(f"{flag}: no such file: {path}")
        checkpoints[method] = str(Path(path).resolve()) if path is not None else None
    if not choice.is_default and parse_spec(choice.spec).is_builtin \
            and None in checkpoints.values():
        raise HarnessRefusal(f"--model {choice.spec}: a built-in without --checkpoint has random "
                             "weights, which certify nothing: its figures would misstate work "
                             "avoidance; pass --checkpoint")
    if args.synsets is not None:
        if args.data is None:
            raise HarnessRefusal("--synsets labels an ImageNet-style --data folder "
                                 "(<synset>/<file>); the default CIFAR-10 images have none")
        if not Path(args.synsets).is_file():
            raise HarnessRefusal(f"--synsets: no such file: {args.synsets}")
    if args.data is not None and not args.data.is_dir():
        raise HarnessRefusal(f"--data: {args.data} is not a folder")
    for name in ("images", "warmup_images", "limit_images", "pipeline_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HarnessRefusal(f"--{name.replace('_', '-')}: expected a whole number >= 1, "
                                 f"got {value}")
    if args.top_k is not None:
        top_k = args.top_k
    elif choice.is_default:
        top_k = recommended["scalecert"].cert["top_k"]
    else:
        top_k = RunConfig.__dataclass_fields__["top_k"].default
    return choice, checkpoints, top_k


def scale_out_rows(runs: list[dict[str, Any]], cores: int) -> list[list[Any]]:
    """Throughput, speed-up over the first run, and parallel efficiency: speed-up / the ratio
    of cores in use (min(workers x threads, cores)) to the first run's."""
    if not runs:
        return []
    base = runs[0]

    def cores_used(run: dict[str, Any]) -> int:
        return min(cores, run["workers"] * cpu_threads(run["workers"], cores))

    rows = []
    for run in runs:
        speed_up = run["images_per_s"] / base["images_per_s"]
        run["speed_up"] = round(speed_up, 3)
        run["parallel_efficiency"] = round(speed_up * cores_used(base) / cores_used(run), 3)
        rows.append([run["workers"], cpu_threads(run["workers"], cores),
                     run["images_per_s"], run["busy_images_per_s"], run["g_runs_per_image"],
                     run["speed_up"],
                     run["parallel_efficiency"], run["fixed_s"]])
    return rows


def summary_rows(figures: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(name, value, target) of the headline ratios."""
    library = figures["library"]
    rows: list[tuple[str, Any, str]] = [
        ("library efficiency (scalecert, avoid)", library["scalecert.avoid"]["efficiency"],
         ">= 0.9"),
        ("library efficiency (scalecert, avoid) vs g at its best batch",
         library["scalecert.avoid"]["efficiency_vs_best_batch"], ""),
        ("library time inside g (scalecert, avoid)", library["scalecert.avoid"]["time_in_g"],
         ""),
        ("library efficiency (scalecert, full map)", library["scalecert.full_map"]["efficiency"],
         ""),
    ]
    if "pipeline" in figures:
        pipeline = figures["pipeline"]
        rows += [
            ("pipeline efficiency (vs g limit)", pipeline["efficiency_vs_limit"], ">= 0.85"),
            ("pipeline / library images/s", pipeline["efficiency_vs_library"], ""),
            ("pipeline / library images/s, in shards", pipeline["busy_efficiency_vs_library"],
             ""),
            ("pipeline outcomes = library", pipeline["outcomes_match_library"], "True"),
            ("ray start-up s (excluded)", figures["ray_start_s"], ""),
        ]
    for mode in ("avoid", "full_map"):
        rows.append((f"speed-up scalecert / masking ({mode})",
                     ratio(library[f"scalecert.{mode}"]["images_per_s"],
                           library[f"masking.{mode}"]["images_per_s"]), ""))
    for method in METHODS:
        rows.append((f"g runs/img vs lower bound ({method}, avoid)",
                     library[f"{method}.avoid"]["vs_lower_bound"],
                     "<= 1.2" if method == "scalecert" else ""))
        rows.append((f"outcomes full map = avoid ({method})",
                     library[method]["outcomes_identical"], "True"))
    return rows


if __name__ == "__main__":
    main()
