"""FAISS building blocks for mmft.index.core: lazy import, factory choice, search parameters, GPU moves.

Everything here works on plain FAISS indexes; mmft.index.core adds ids, manifests and model checks.
"""
from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger("mmft.index.core")

# Galleries below this size use exact search by default: ~1,000 queries/s at D=256 on 2 cores, and
# IVF on 100k weakly clustered vectors lost 10-15 points of recall@10 (tools/bench_index.py).
FLAT_MAX = 250_000
_ADD_CHUNK = 65_536


def faiss_module():
    """Import faiss, or fail in one line saying what to install."""
    try:
        import faiss
    except ImportError:
        raise ImportError("mmft indexes need FAISS: `pip install faiss-cpu` (or faiss-gpu-cu12 / faiss-cuda "
                          "for GPU search)") from None
    return faiss


# ---------------------------------------------------------------- factory choice


def default_factory(n: int, fp16: bool = False) -> str:
    """FAISS factory for a gallery of n vectors: exact below FLAT_MAX, else an inverted file.

    IVF with ~4 * sqrt(n) lists (a power of two: 4096 for 1M) scanned at `default_nprobe` lists per query;
    on 1M well-separated clustered unit vectors (D=256, 2-core CPU) it answered ~20x faster than Flat at
    the same recall@10; where clusters overlap it loses recall, so measure it instead: index.target_recall
    (mmft.index.tuning, docs/benchmarks.md). fp16 stores the vectors as float16 (half the memory).
    """
    code = "SQfp16" if fp16 else "Flat"
    if n < FLAT_MAX:
        return code
    return f"IVF{default_nlist(n)},{code}"


def default_nlist(n: int) -> int:
    return 2 ** round(math.log2(4 * math.sqrt(n)))


def default_nprobe(nlist: int) -> int:
    """IVF lists scanned per query by default: 1/128 of the lists, at least 16 (at most all of them)."""
    return min(nlist, max(16, nlist // 128))


def resolve_factory(factory: str, n: int, fp16: bool = False) -> str:
    """The factory an index over n vectors uses: `factory`, or `default_factory(n)` when it is "",
    stored as float16 when fp16 (index.factory / index.fp16, the same choice for every builder)."""
    factory = factory or default_factory(n)
    return apply_fp16(factory) if fp16 else factory


def default_ef_search(factory: str) -> int | None:
    """HNSW candidates kept per query by default (64; FAISS's own default is 16); None without HNSW."""
    return 64 if "HNSW" in factory else None


def apply_fp16(factory: str) -> str:
    """Store vectors as float16: 'Flat' -> 'SQfp16', 'IVFn,Flat' -> 'IVFn,SQfp16',
    'HNSW32' -> 'HNSW32,SQfp16'."""
    if factory == "Flat":
        return "SQfp16"
    if factory.endswith(",Flat"):
        return factory[: -len("Flat")] + "SQfp16"
    if factory.startswith("HNSW") and "," not in factory:
        return factory + ",SQfp16"
    return factory


def extract_ivf(index):
    faiss = faiss_module()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_search_params(index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set IVF lists probed and/or HNSW efSearch on a CPU or GPU index (ignored where not applicable)."""
    faiss = faiss_module()
    gpu = hasattr(faiss, "GpuParameterSpace") and "Gpu" in type(index).__name__
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    if nprobe and extract_ivf(index) is not None:
        space.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search:
        try:
            space.set_index_parameter(index, "efSearch", int(ef_search))
        except RuntimeError:
            pass  # no HNSW level in this index


def apply_search_defaults(index, factory: str, nprobe: int = 0,
                          ef_search: int | None = None) -> tuple[int | None, int | None]:
    """Set and return (nprobe, efSearch): the values given, else the defaults of the index's kind."""
    ivf = extract_ivf(index)
    nprobe = (nprobe or default_nprobe(ivf.nlist)) if ivf is not None else None
    ef_search = ef_search or default_ef_search(factory)
    set_search_params(index, nprobe=nprobe, ef_search=ef_search)
    return nprobe, ef_search


def _gpu_wanted(use_gpu: str) -> bool:
    faiss = faiss_module()
    if use_gpu not in ("auto", "never", "always"):
        raise ValueError(f"index.use_gpu={use_gpu!r} is not one of 'auto', 'never', 'always'")
    has = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu == "always" and not has:
        raise RuntimeError("index.use_gpu='always' but FAISS sees no GPU: install faiss-gpu-cu12 "
                           "(CUDA 12) or faiss-cuda (CUDA 13) on a GPU machine, or set index.use_gpu=auto")
    return has and use_gpu != "never"


_GPU_RES = None


def to_gpu(index, use_gpu: str = "auto"):
    """The index on GPU 0 when wanted and supported (HNSW is not: it stays on the CPU), else unchanged."""
    global _GPU_RES
    if not _gpu_wanted(use_gpu):
        return index
    faiss = faiss_module()
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_GPU_RES, 0, index)
    except RuntimeError as e:
        if use_gpu == "always":
            raise RuntimeError(f"this FAISS index type cannot run on the GPU ({str(e).splitlines()[0]}); "
                               "use an IVF or Flat factory, or index.use_gpu=auto") from None
        logger.info("index stays on the CPU: %s", str(e).splitlines()[0])
        return index


def to_cpu(index):
    faiss = faiss_module()
    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


# ---------------------------------------------------------------- building


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)  # (n, D)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def empty_faiss_index(dim: int, factory: str):
    """An untrained inner-product index of `factory` for dim-d vectors; a bad factory is a ValueError."""
    faiss = faiss_module()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1][:160]
        raise ValueError(f"FAISS cannot build factory '{factory}' for {dim}-d vectors ({reason}); "
                         "try 'Flat', 'IVF1024,Flat' or 'HNSW32'") from None


def training_rows(n: int, index, train_sample: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers (k,) of the seeded sample `index` trains on, out of n gallery rows.

    Every builder draws it here, so a distributed merge trains on exactly the rows a single process does.
    """
    ivf = extract_ivf(index)
    # k-means needs ~40 training rows per list (FAISS warns below 39)
    want = max(train_sample, 40 * ivf.nlist) if ivf is not None else train_sample
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, want), replace=False))


def new_faiss_index(vectors: np.ndarray, factory: str, *, train_sample: int = 100_000, seed: int = 0,
                    use_gpu: str = "never", progress: bool = False):
    """Train (on a seeded sample) and fill a FAISS inner-product index with the rows of `vectors` (N, D)."""
    n, dim = vectors.shape
    index = to_gpu(empty_faiss_index(dim, factory), use_gpu)
    if not index.is_trained:
        index.train(unit_rows(vectors[training_rows(n, index, train_sample, seed)]))
    chunks = range(0, n, _ADD_CHUNK)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="index add", unit="chunk")
    for s in chunks:
        index.add(unit_rows(vectors[s:s + _ADD_CHUNK]))
    ivf = extract_ivf(index)
    if ivf is not None:
        set_search_params(index, nprobe=default_nprobe(ivf.nlist))
    return index
