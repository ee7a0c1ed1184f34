"""lm-evaluation-harness inside a stage: a task spec (a registered name or a local task YAML) resolved
the way the harness resolves it, its identity for the fingerprint, the checks that run before a model
loads, and one task's evaluation with the harness's own results JSON and per-sample logs.

A local task YAML is read exactly as lm_eval reads it (its loader, `include:` merged under the file's own
keys, `!function` beside the file), with two additions for files that travel with a repository: an
`include:` that is not found beside the file is looked up among lm_eval's installed tasks (so
`include: hellaswag/hellaswag.yaml` takes the real prompts, process_docs and metrics without an absolute
path into a virtual environment), and relative `dataset_kwargs.data_files` are relative to the YAML file
rather than to the working directory. A YAML that needs neither is evaluated identically by
`lm_eval run --include_path DIR --tasks NAME`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import yaml

log = logging.getLogger("kiln.eval")

# `datasets` builders that read local files: a task with one of these as dataset_path needs no hub
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
_HASH_WHOLE_BYTES = 256 << 20  # data files above this are identified by size and mtime, not content


class TaskError(Exception):
    """Bad input for one task, found before the model loads: recorded with its reason, the other tasks run."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def harness_version() -> str:
    return importlib.metadata.version("lm_eval")


def installed_tasks_dir() -> str:
    """lm_eval's task directory, found without importing lm_eval (planning a pipeline stays quick)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("lm_eval is not installed: pip install 'lm_eval[hf]==0.4.13'")
    return os.path.join(list(spec.submodule_search_locations)[0], "tasks")


def is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(path: str) -> dict[str, Any]:
    """A file's content (its name and hash; size and mtime for very large files). No directory: the same
    files in another checkout are the same task."""
    st = os.stat(path)
    if st.st_size > _HASH_WHOLE_BYTES:
        return {"name": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"name": os.path.basename(path), "sha256": sha256_file(path)}


# --------------------------------------------------------------------------------------------------
# reading task YAMLs


class _FunctionRef(str):
    """A `!function module.name` tag, kept as text (for identity: which module file it names)."""


def _identity_loader(base: str) -> type:
    # the same base loader lm_eval uses, so a file that parses there parses here
    parent = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.FullLoader

    class Loader(parent):  # type: ignore[misc, valid-type]
        pass

    Loader.add_constructor("!function", lambda loader, node: _FunctionRef(loader.construct_scalar(node)))
    return Loader


def resolve_include(include: str, yaml_path: str) -> str:
    """lm_eval's rule (absolute, or relative to the including file), then lm_eval's installed tasks."""
    if os.path.isabs(include):
        return include
    beside = os.path.normpath(os.path.join(os.path.dirname(yaml_path), include))
    if os.path.exists(beside):
        return beside
    installed = os.path.normpath(os.path.join(installed_tasks_dir(), include))
    if os.path.exists(installed):
        return installed
    raise TaskError(
        "bad_task_file",
        f"{yaml_path}: include {include!r} is neither beside the file nor among lm_eval's installed tasks "
        f"({installed_tasks_dir()})",
    )


def _absolute_data_files(value: Any, base: str) -> Any:
    if isinstance(value, str):
        return value if os.path.isabs(value) or "://" in value else os.path.normpath(os.path.join(base, value))
    if isinstance(value, list):
        return [_absolute_data_files(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute_data_files(v, base) for k, v in value.items()}
    return value


def _data_file_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [f for v in value for f in _data_file_list(v)]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _data_file_list(v)]
    return []


def load_task_config(path: str, resolve_functions: bool = True) -> tuple[dict[str, Any], list[str]]:
    """A local task YAML as lm_eval reads it (see the module's docstring): (the merged config, the YAML
    files read). `resolve_functions=False` keeps `!function` tags as text (no import). TaskError for a
    file that does not parse or names an include that does not exist."""
    path = os.path.abspath(path)
    files: list[str] = []

    def load(p: str, seen: tuple[str, ...]) -> dict[str, Any]:
        if p in seen:
            raise TaskError("bad_task_file", f"{path}: includes itself ({' -> '.join([*seen, p])})")
        files.append(p)
        try:
            if resolve_functions:
                from lm_eval.tasks._yaml_loader import load_yaml

                raw = load_yaml(p, resolve_func=True, recursive=False)
            else:
                with open(p, "rb") as f:
                    raw = yaml.load(f, Loader=_identity_loader(os.path.dirname(p)))  # noqa: S506 (a safe loader)
        except yaml.YAMLError as e:
            raise TaskError("bad_task_file", f"{p}: does not parse as YAML: {' '.join(str(e).split())}") from None
        except (ImportError, AttributeError, ValueError) as e:  # a !function that does not import; no mapping
            raise TaskError("bad_task_file", f"{p}: {type(e).__name__}: {e}") from None
        except OSError as e:
            raise TaskError("bad_task_file", f"{p}: cannot be read: {e}") from None
        if not isinstance(raw, dict):
            raise TaskError("bad_task_file", f"{p}: a task file is a mapping, not a {type(raw).__name__}")
        includes = raw.pop("include", None)
        if includes is None:
            return raw
        merged: dict[str, Any] = {}
        for inc in includes if isinstance(includes, list) else [includes]:
            sub = load(resolve_include(str(inc), p), (*seen, p))
            sub.pop("task_list", None)  # as lm_eval: a task list belongs to the file that declares it
            merged.update(sub)
        merged.update(raw)  # the including file's keys win
        return merged

    cfg = load(path, ())
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        absolute = _absolute_data_files(kwargs["data_files"], os.path.dirname(path))
        cfg["dataset_kwargs"] = {**kwargs, "data_files": absolute}
    if isinstance(cfg.get("dataset_path"), str) and cfg["dataset_path"].startswith((".", "/")):
        cfg["dataset_path"] = _absolute_data_files(cfg["dataset_path"], os.path.dirname(path))
    if "task" not in cfg and "group" not in cfg:
        raise TaskError("bad_task_file", f"{path}: no `task:` (the task's name)")
    return cfg, files


def cli_compatible(path: str) -> bool:
    """Would `lm_eval run --include_path DIR` read this file as Kiln does (no include found only among the
    installed tasks, no relative data file)?"""
    try:
        with open(path, "rb") as f:
            raw = yaml.load(f, Loader=_identity_loader(os.path.dirname(path)))  # noqa: S506 (a safe loader)
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(raw, dict):
        return False
    includes = raw.get("include") or []
    for inc in includes if isinstance(includes, list) else [includes]:
        if not (os.path.isabs(str(inc)) or os.path.exists(os.path.join(os.path.dirname(path), str(inc)))):
            return False
    kwargs = raw.get("dataset_kwargs") or {}
    files = _data_file_list(kwargs.get("data_files")) if isinstance(kwargs, dict) else []
    return all(os.path.isabs(f) or "://" in f for f in files)


def data_files_of(cfg: dict[str, Any]) -> list[str]:
    kwargs = cfg.get("dataset_kwargs") or {}
    files = _data_file_list(kwargs.get("data_files")) if isinstance(kwargs, dict) else []
    path = cfg.get("dataset_path")
    if isinstance(path, str) and os.path.isdir(path):
        files += sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))
    return files


def hub_dataset(cfg: dict[str, Any]) -> str | None:
    """The hub dataset a task config downloads, or None when its data is local."""
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or path in LOCAL_BUILDERS or os.path.isabs(path) or os.path.exists(path):
        return None
    return path


# --------------------------------------------------------------------------------------------------
# identity (for fingerprints and unit keys): no lm_eval import, no model, no data loading


def task_identity(spec: str) -> dict[str, Any]:
    """What a task's numbers depend on besides the model and the settings. A registered task is its name
    and the harness version (its YAMLs ship with the harness); a local file is its content, the YAMLs it
    includes, the modules its functions live in and its data files."""
    if not is_task_file(spec):
        return {"task": spec, "lm_eval": harness_version()}
    path = os.path.abspath(spec)
    out: dict[str, Any] = {"file": file_identity(path)}
    try:
        cfg, files = load_task_config(path, resolve_functions=False)
    except TaskError as e:  # the unit records the error; the identity is the bytes that cause it
        return {**out, "unreadable": e.reason}
    modules = set()
    for value in cfg.values():
        if isinstance(value, _FunctionRef):
            module = os.path.join(os.path.dirname(path), value.rpartition(".")[0].replace(".", "/") + ".py")
            modules.add(module)
    out["includes"] = [file_identity(f) for f in files[1:]]
    out["modules"] = [file_identity(m) for m in sorted(modules) if os.path.isfile(m)]
    out["data"] = [
        file_identity(f) if os.path.isfile(f) else {"name": os.path.basename(f), "missing": True}
        for f in data_files_of(cfg)
    ]
    out["hub"] = hub_dataset(cfg)
    out["lm_eval"] = harness_version()
    return out


def task_name_of(spec: str) -> str | None:
    """The name a spec evaluates under: the name itself, or a file's `task:` (None if it cannot be read)."""
    if not is_task_file(spec):
        return spec
    try:
        cfg, _ = load_task_config(spec, resolve_functions=False)
    except TaskError:
        return None
    return str(cfg.get("task") or cfg.get("group"))


# --------------------------------------------------------------------------------------------------
# the registry of installed tasks (for names): built once per process, it reads ~15k YAMLs


_MANAGERS: dict[bool, Any] = {}
_MANAGER_LOCK = threading.Lock()


def task_manager(with_installed: bool) -> Any:
    with _MANAGER_LOCK:
        if with_installed not in _MANAGERS:
            from lm_eval.tasks import TaskManager

            _MANAGERS[with_installed] = TaskManager(include_defaults=with_installed)
        return _MANAGERS[with_installed]


def check_task_names(names: list[str]) -> None:
    """Every name is a registered task, group or tag: StageInputError naming the ones that are not."""
    import difflib

    from tasks.stage import StageInputError

    if not names:
        return
    known = set(task_manager(True).all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=3)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise StageInputError(
            "tasks",
            f"unknown lm_eval task {', '.join(hints)}: not a registered task, group or tag of lm_eval "
            f"{harness_version()} (`lm_eval ls tasks` lists them); a local task file's path ends in .yaml",
        )


def registered_configs(name: str) -> list[dict[str, Any]]:
    """The configs (functions unresolved) of a registered task or of every task of a group or tag."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    index = task_manager(True).task_index
    entry = index[name]
    if entry.kind == Kind.TAG:
        return [c for t in sorted(entry.tags) if t in index for c in registered_configs(t)]
    if entry.kind == Kind.GROUP:
        cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else dict(entry.cfg or {})
        members = cfg.get("task") or []
        out = []
        for m in members if isinstance(members, list) else [members]:
            member = m if isinstance(m, str) else (m.get("task") or m.get("group"))
            if isinstance(member, str) and member in index:
                out += registered_configs(member)
        return out
    if entry.yaml_path:
        return [load_yaml(entry.yaml_path, resolve_func=False)]
    return [dict(entry.cfg or {})]


# --------------------------------------------------------------------------------------------------
# checks before the model loads


def _hub_cached(dataset: str) -> bool:
    """Is a copy of the hub dataset in the local caches (datasets' or the hub's), for offline use?"""
    from datasets import config as ds_config
    from huggingface_hub import constants

    org_name = dataset.replace("/", "___")
    if os.path.isdir(os.path.join(ds_config.HF_DATASETS_CACHE, org_name)):
        return True
    return os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "datasets--" + dataset.replace("/", "--")))


def _offline_flag() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


_REACHABLE: dict[str, tuple[float, str | None]] = {}


def _hub_unreachable(dataset: str) -> str | None:
    """Why the hub cannot serve `dataset` right now, or None if it can (asked once a minute per process)."""
    import time

    flag = _offline_flag()
    if flag:
        return f"{flag} is set"
    now = time.monotonic()
    cached = _REACHABLE.get(dataset)
    if cached and now - cached[0] < 60:
        return cached[1]
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(dataset, timeout=10)
        why = None
    except RepositoryNotFoundError:
        why = "the hub has no such dataset (or it is private)"
    except HfHubHTTPError:
        why = None  # it answered (gated, rate-limited): the download will say more
    except Exception as e:  # connection refused, DNS, timeouts: offline for our purpose
        why = f"the hub cannot be reached ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    _REACHABLE[dataset] = (now, why)
    return why


def check_hub_data(task: str, configs: list[dict[str, Any]]) -> None:
    """A task whose data is on the hub needs the hub or a cached copy: StageInputError naming the task
    otherwise. This is the machine's state, not the input's, so it fails the unit (a later run online
    redoes it) instead of being recorded in the artifact."""
    from tasks.stage import StageInputError

    for cfg in configs:
        dataset = hub_dataset(cfg)
        if dataset is None or _hub_cached(dataset):
            continue
        why = _hub_unreachable(dataset)
        if why:
            raise StageInputError(
                "tasks",
                f"task {task!r} reads the dataset {dataset!r} from the Hugging Face hub, and {why}, with no "
                "cached copy: run where the hub is reachable (or with HF_HOME pointing at a cache that has it), "
                "or evaluate local task files (examples/eval holds look-alikes of the four benchmarks)",
            )


def check_hub_model(name: str) -> None:
    """A model named by its hub id needs the hub or a cached copy: StageInputError before anything loads."""
    from huggingface_hub import constants

    from tasks.stage import StageInputError

    if os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "models--" + name.replace("/", "--"))):
        return
    flag = _offline_flag()
    if flag:
        raise StageInputError(
            "model_path", f"{name!r} is neither a local directory nor in the hub cache, and {flag} is set"
        )


def check_data_files(task: str, cfg: dict[str, Any]) -> None:
    """Local data files exist and, for JSON lines, every line parses: TaskError naming the file and line."""
    for path in data_files_of(cfg):
        if "://" in path:
            continue
        if not os.path.isfile(path):
            raise TaskError("missing_data_file", f"task {task!r}: data file {path} does not exist")
        if path.endswith((".jsonl", ".jsonl.gz")) or (path.endswith(".json") and _looks_like_lines(path)):
            for n, line in enumerate(_lines(path), 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as e:
                    raise TaskError("bad_data_file", f"task {task!r}: line {n} of {path} is not JSON: {e}") from None


def _lines(path: str):
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def _looks_like_lines(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1).strip()
    return head == "{"


def missing_fields(cfg: dict[str, Any]) -> str | None:
    """After a task failed to read or render its rows: the first JSON-lines row that lacks a field the
    file's first row has, as 'row N of FILE lacks ...' (None if every row has the same fields)."""
    for path in data_files_of(cfg):
        if not os.path.isfile(path) or not path.endswith((".jsonl", ".json")):
            continue
        first: set[str] | None = None
        for n, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                return None
            if not isinstance(row, dict):
                return f"row {n} of {path} is not an object"
            keys = set(row)
            if first is None:
                first = keys
            elif first - keys:
                return f"row {n} of {path} lacks {', '.join(repr(k) for k in sorted(first - keys))}"
    return None


def check_tokenizer(model_dir: str) -> None:
    from tasks.tokenize.hf import TOKENIZER_MARKERS

    if os.path.isdir(model_dir) and not any(os.path.exists(os.path.join(model_dir, m)) for m in TOKENIZER_MARKERS):
        raise TaskError(
            "no_tokenizer",
            f"{model_dir} holds no tokenizer ({', '.join(TOKENIZER_MARKERS)}): the harness needs one to turn "
            "prompts into tokens; save the tokenizer beside the weights",
        )


# --------------------------------------------------------------------------------------------------
# building a task, and the texts of its items


@dataclass
class BuiltTask:
    """A task as the harness will run it, its data read and every item rendered once."""

    name: str
    spec: str
    file: str | None
    objects: list[Any]  # what simple_evaluate is given: one Task, one Group, or a tag's Tasks
    leaves: list[Any] = field(default_factory=list)  # the Task objects
    configs: list[dict[str, Any]] = field(default_factory=list)


def build_task(spec: str, shots: int | None) -> BuiltTask:
    """Resolve, check and build one spec with lm_eval, and render every item once, so that a task that
    cannot run fails here, before any model loads: TaskError (recorded, the others run), or
    StageInputError when its data is on an unreachable hub."""
    if is_task_file(spec):
        cfg, _ = load_task_config(spec, resolve_functions=True)
        name = str(cfg.get("task") or cfg.get("group"))
        check_hub_data(name, [cfg])
        check_data_files(name, cfg)
        loader, configs, file = cfg, [cfg], os.path.abspath(spec)
    else:
        name, file = spec, None
        configs = registered_configs(spec)
        check_hub_data(name, configs)
        loader = spec
    manager = task_manager(not is_task_file(spec) or "group" in configs[0])
    where = f"task {name!r}" + (f" ({file})" if file else "")
    try:
        with _quiet_datasets():
            loaded = manager.load([loader])
    except Exception as e:  # the harness failed to read the data: name the task, the file and the row
        if any(hub_dataset(c) for c in configs):
            raise  # fetching from the hub failed: the network's or the hub's state, not input to record
        row = missing_fields(configs[0]) if file else None
        raise TaskError(
            "missing_field" if isinstance(e, KeyError) or row else "bad_task",
            f"{where}: reading its data failed: {type(e).__name__}: {e}" + (f"; {row}" if row else ""),
        ) from None
    groups, leaves = loaded.get("groups") or {}, loaded["tasks"]
    if name in groups:
        objects = [groups[name]]
    elif name in leaves:
        objects = [leaves[name]]
    else:  # a tag: its tasks, each reported on its own
        objects = list(leaves.values())
    built = BuiltTask(name, spec, file, objects, list(leaves.values()), configs)
    for leaf in built.leaves:
        n = shots if shots is not None and leaf.get_config("num_fewshot") != 0 else leaf.get_config("num_fewshot")
        render_items(leaf, where, configs[0] if file else None, n or 0)
    return built


def _docs(task: Any, which: str) -> list[Any]:
    docs = task.eval_docs if which == "eval" else task.fewshot_docs()
    return list(docs) if docs is not None else []


def render_items(task: Any, where: str, cfg: dict[str, Any] | None, shots: int) -> None:
    """Render every evaluation and few-shot item the way the harness will: a row missing a field the
    prompt or the answer needs fails here, named."""
    output_type = task.get_config("output_type")
    for which in ("eval", "fewshot") if shots else ("eval",):
        try:
            docs = _docs(task, which)
        except Exception as e:
            raise TaskError(
                "bad_task", f"{where}: its {which} documents cannot be read: {type(e).__name__}: {e}"
            ) from None
        if which == "fewshot" and len(docs) < shots:
            raise TaskError("bad_task", f"{where}: {shots}-shot needs {shots} few-shot documents, it has {len(docs)}")
        for i, doc in enumerate(docs):
            try:
                task.doc_to_text(doc)
                target = task.doc_to_target(doc)
                if output_type == "multiple_choice":
                    choices = task.doc_to_choice(doc)
                    if isinstance(target, int) and not 0 <= target < len(choices):
                        raise ValueError(f"the answer index {target} is outside the {len(choices)} choices")
            except Exception as e:
                row = missing_fields(cfg) if cfg else None
                raise TaskError(
                    "missing_field",
                    f"{where}: {which} item {i} cannot be rendered: {type(e).__name__}: {e}"
                    + (f"; {row}" if row else ""),
                ) from None


def item_texts(task: Any) -> list[str]:
    """The words of each evaluation item, for contamination checks: the task's decontamination query
    where it declares one (Winogrande's sentence, TruthfulQA's question), else the prompt and the answer."""
    out = []
    for doc in _docs(task, "eval"):
        if task.get_config("should_decontaminate"):
            out.append(str(task.doc_to_decontamination_query(doc)))
            continue
        text = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if task.get_config("output_type") == "multiple_choice":
            choices = task.doc_to_choice(doc)
            if isinstance(text, int):  # Winogrande-style: the choice is the context
                text = choices[text] if 0 <= text < len(choices) else ""
            if isinstance(target, int) and 0 <= target < len(choices):
                target = choices[target]
        out.append(f"{text if isinstance(text, str) else ''} {target if isinstance(target, str) else ''}".strip())
    return out


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` draws a progress bar per split read; a stage's log wants a line per task instead."""
    try:
        from datasets.utils import logging as ds_logging

        was = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
    except Exception:  # an older datasets without the switch: the bars stay
        yield
        return
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# the model, once per process


_LMS: dict[tuple, tuple[Any, threading.Lock]] = {}
_LMS_LOCK = threading.Lock()


def resolved_device(device: str) -> str:
    import torch

    if device == "gpu" or (device == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def resolved_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def model_args(model_dir: str, dtype: str, max_length: int | None) -> dict[str, Any]:
    """What `lm_eval run --model hf --model_args ...` would be given for the same model."""
    args: dict[str, Any] = {"pretrained": model_dir, "dtype": dtype}
    if max_length:
        args["max_length"] = max_length
    return args


def load_lm(model_dir: str, dtype: str, device: str, batch_size: int, max_length: int | None) -> tuple[Any, Any]:
    """(lm_eval's HFLM for the model, a lock to hold while evaluating with it), loaded once per process:
    units of one stage in threads of one worker share it, one evaluation at a time (each already uses
    every core through torch)."""
    from tasks.train.model import model_identity

    key = (model_dir, str(model_identity(model_dir)), dtype, device, batch_size, max_length)
    with _LMS_LOCK:
        if key not in _LMS:
            from lm_eval.api.registry import get_model

            if len(_LMS) >= 2:
                _LMS.clear()
            lm = get_model("hf").create_from_arg_obj(
                model_args(model_dir, dtype, max_length), {"batch_size": batch_size, "device": device}
            )
            _LMS[key] = (lm, threading.Lock())
        return _LMS[key]


@dataclass
class TaskRun:
    results: dict[str, Any]  # the harness's results (samples taken out)
    results_json: str  # as the harness wrote it
    samples_jsonl: dict[str, list[str]]  # per task: the harness's per-sample log lines


def evaluate(
    built: BuiltTask,
    lm: Any,
    num_fewshot: int | None,
    limit: int | None,
    bootstrap_iters: int,
    args: dict[str, Any],
    workdir: str,
) -> TaskRun:
    """One task through `simple_evaluate`, then the harness's EvaluationTracker writes its results JSON
    and per-sample logs exactly as `lm_eval run --output_path DIR --log_samples` does."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    out_dir = os.path.join(workdir, "lm_eval")
    os.makedirs(out_dir, exist_ok=True)
    tracker = EvaluationTracker(output_path=out_dir)
    with _quiet_datasets():
        results = simple_evaluate(
            model=lm,
            tasks=built.objects,
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=True,
            evaluation_tracker=tracker,
            task_manager=task_manager(False),
        )
    # the CLI records the model it was given by name; a preloaded model is recorded as "CUSTOM"
    results["config"].update(model="hf", model_args=args, batch_size=lm.batch_size, device=str(lm.device))
    samples = results.pop("samples")
    tracker.general_config_tracker.model_name_sanitized = "model"
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    written = glob.glob(os.path.join(out_dir, "model", "results_*.json"))
    with open(sorted(written)[-1], encoding="utf-8") as f:
        results_json = f.read()
    lines: dict[str, list[str]] = {}
    for task_name in results["configs"]:
        found = sorted(glob.glob(os.path.join(out_dir, "model", f"samples_{glob.escape(task_name)}_*.jsonl")))
        lines[task_name] = []
        for path in found[-1:]:
            with open(path, encoding="utf-8") as f:
                lines[task_name] = [line.rstrip("\n") for line in f if line.strip()]
    return TaskRun(results=results, results_json=results_json, samples_jsonl=lines)


HEADLINE_ORDER = ("acc_norm", "acc", "exact_match", "f1", "mcc", "bleu", "word_perplexity")


def metric_rows(run: TaskRun, name: str, headline: str | None) -> list[dict[str, Any]]:
    """The harness's numbers as rows: one per (task or group, metric, filter), its standard error when
    the harness computed one, the sample count and shots; the task's headline metric marked."""
    res = run.results
    parents = {}
    for group, members in (res.get("group_subtasks") or {}).items():
        for m in members:
            parents[m] = group
    rows = []
    for task, values in res["results"].items():
        n = (res.get("n-samples") or {}).get(task, {}).get("effective")
        shots = (res.get("n-shot") or {}).get(task)
        better = (res.get("higher_is_better") or {}).get(task) or {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            stderr = None if isinstance(stderr, bool) or not isinstance(stderr, (int, float)) else float(stderr)
            rows.append(
                {
                    "task": name,
                    "subtask": task,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": stderr,
                    "n": int(n) if n is not None else None,
                    "num_fewshot": int(shots) if isinstance(shots, int) else None,
                    "higher_is_better": better.get(metric),
                    "group": parents.get(task),
                }
            )
    top = [r for r in rows if r["subtask"] == name] or rows
    metrics = [r["metric"] for r in top]
    chosen = headline if headline in metrics else next((m for m in HEADLINE_ORDER if m in metrics), None)
    chosen = chosen or (metrics[0] if metrics else None)
    for r in rows:
        r["headline"] = r["subtask"] == (top[0]["subtask"] if top else None) and r["metric"] == chosen
        if r["headline"]:
            chosen = None  # one headline row (the first filter)
    return rows
