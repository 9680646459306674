"""Hand a loaded (tuned) model to EleutherAI's lm-evaluation-harness, for tasks beyond dlzo's own eleven.

The model and tokenizer are the ones already in memory (a run's checkpoint from
`dlzo.training.run_model.load_checkpoint_of_run`, or `dlzo.model.loading.load_model`): they are wrapped in the harness's `HFLM`,
never reloaded, so the tuned tensors are what is scored. Tasks are the harness's names, or the names of task
YAMLs under `include_path` (local data: nothing here downloads anything, but a harness task whose YAML names
a hub dataset will try to). The harness sets Python's, NumPy's and torch's global seeds (its defaults) when
it runs; dlzo's perturbations never come from those.

Needs the optional extra: pip install 'dlzo[harness]'.
"""

from __future__ import annotations

import json
from pathlib import Path

from dlzo.errors import DlzoError, first_line

INSTALL_HINT = "pip install 'dlzo[harness]'"


def _import_lm_eval():
    """lm_eval's entry points, or a one-line DlzoError saying how to install it."""
    # lm-eval is a heavy optional dependency (about 350 MB with scikit-learn, scipy, nltk, sacrebleu; 5 s to
    # import), so it is imported here, only when a harness evaluation is asked for: the one in-function import
    # of a third-party package in dlzo.harness.
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as err:
        if getattr(err, "name", None) == "lm_eval":
            raise DlzoError(f"evaluating with the lm-evaluation-harness needs lm-eval: {INSTALL_HINT}") from None
        raise DlzoError(f"lm-eval is installed but does not import ({err}): reinstall with {INSTALL_HINT}") from None
    return lm_eval.simple_evaluate, HFLM, TaskManager, handle_non_serializable


def _resolve_tasks(tasks: list[str], task_manager, include_path: str | None) -> list[str]:
    """The task list for the harness: names it knows and YAML files as given, glob patterns ("mmlu_*")
    expanded; an empty list or an unknown name is refused in one line, before anything is scored."""
    if not tasks:
        raise DlzoError("no harness task named: give at least one, e.g. ['arc_easy'] or a task under include_path")
    known = set(task_manager.all_tasks)
    resolved, unknown = [], []
    for task in tasks:
        matches = [task] if task in known or Path(task).is_file() else task_manager.match_tasks([task])
        resolved.extend(matches)
        if not matches:
            unknown.append(task)
    if unknown:
        where = f" (nor under {include_path})" if include_path else " (local task YAMLs: pass include_path)"
        raise DlzoError(f"lm-evaluation-harness knows no task {', '.join(unknown)}{where}")
    return resolved


def evaluate_with_harness(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    *,
    log_samples: bool = False,
) -> dict:
    """Score `model` on lm-evaluation-harness `tasks` and return the harness's results as plain JSON data:
    `results` (per task: metrics such as acc, acc_norm and their stderr), `configs`, `versions`, `n-shot`,
    `n-samples`, `config`, and with `log_samples` also `samples` (per document: the requests and the
    model's answers, e.g. each choice's summed log-likelihood). `limit` caps the documents of each task;
    `num_fewshot` overrides the tasks' own number of demonstrations."""
    simple_evaluate, HFLM, TaskManager, handle_non_serializable = _import_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise DlzoError(f"harness include path {include_path} is not a folder of task YAMLs")
    task_manager = TaskManager(include_path=include_path)
    tasks = _resolve_tasks(list(tasks), task_manager, include_path)
    model.eval()  # the harness puts only the models it loads itself in eval mode
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=log_samples,
        )
    except OSError as err:  # a missing file, and ConnectionError: most tasks' data is on the Hub
        reason = first_line(err)
        offline = isinstance(err, ConnectionError) or any(w in reason.lower() for w in ("reach", "offline", "connect"))
        hint = ("; offline? the harness reads most tasks' data from the Hugging Face Hub: use a cached copy "
                "(HF_DATASETS_OFFLINE=1) or --harness-include with local files") if offline else ""
        raise DlzoError(f"lm-evaluation-harness could not read the data of {', '.join(tasks)} ({reason}){hint}"
                        ) from None
    if results is None:  # a non-zero rank of a multi-process run: rank 0 holds the results
        return {}
    # configs and samples hold callables, numpy numbers and sets: keep what JSON can say (the harness's own
    # rule for its results files)
    return json.loads(json.dumps(dict(results), default=handle_non_serializable))
