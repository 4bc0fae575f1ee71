"""Distributed helpers: consistency checks of accelerate config files (recipes/accelerate/*.yaml),
and :func:`on_main_process` for work that one process does while the others of a launch wait.

accelerate silently ignores unknown keys inside ``fsdp_config`` / ``deepspeed_config`` (they become
launcher options only if the launcher knows them), so a typo there changes nothing and says
nothing. :func:`check_accelerate_config` returns the problems: unknown top-level or nested keys
(with suggestions), an FSDP wrap class our model does not have, mixed precision that Gemma 2/3
cannot use.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

import yaml

from gemma_hf.errors import GemmaHFError


class MainProcessFailed(GemmaHFError):
    """Raised on the other processes of a launch when the main process's share of the work failed."""


def on_main_process(state, work: Callable[[], Any], what: str) -> Any:
    """``work()`` on the main process only, while the other processes wait; its (picklable) result is
    returned on every process. A failure on the main process raises there as itself and on the
    others as :class:`MainProcessFailed` naming it, instead of leaving them at a barrier.

    For work that is not worth sharing out (an evaluation, a merge) and that writes files once.
    Library behaviour relied on: accelerate's ``broadcast_object_list`` is a blocking collective
    (torch.distributed's), so the waiting processes are held by the process group's timeout --
    torch's default of 30 minutes, which accelerate does not change unless a script passes
    ``InitProcessGroupKwargs(timeout=...)``: main-process work longer than that fails the launch.
    """
    if state.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    error: BaseException | None = None
    if state.is_main_process:
        try:
            outcome = [("ok", work())]
        except BaseException as err:  # noqa: BLE001 - reported to the others, then re-raised here
            error = err
            outcome = [("failed", f"{type(err).__name__}: {err}")]
    broadcast_object_list(outcome, from_process=0)
    if error is not None:
        raise error
    status, value = outcome[0]
    if status == "failed":
        raise MainProcessFailed(f"{what} failed on the main process: {value}")
    return value


# --------------------------------------------------------------------------------------------
# accelerate config files
# --------------------------------------------------------------------------------------------


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def check_accelerate_config(path: str | Path) -> list[str]:
    from accelerate.commands.config.config_args import ClusterConfig

    from gemma_hf.model import modeling

    path = Path(path)
    problems: list[str] = []
    try:
        ClusterConfig.from_yaml_file(str(path))  # accelerate's own check: unknown top-level keys, enums
    except Exception as err:  # noqa: BLE001 - any refusal is a problem to report
        problems.append(f"{path}: accelerate rejects it: {err}")
        return problems
    config = yaml.safe_load(path.read_text())
    options = _launch_options()
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in (config.get(section) or {}):
            name = key if key.startswith(prefix) else prefix + key
            if name not in options:
                close = difflib.get_close_matches(name, sorted(options), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"{path}: {section}.{key} is not an accelerate option{hint}")
    fsdp = config.get("fsdp_config") or {}
    wrap = fsdp.get("fsdp_transformer_layer_cls_to_wrap")
    if wrap:
        for name in str(wrap).split(","):
            if not hasattr(modeling, name.strip()):
                problems.append(f"{path}: fsdp_transformer_layer_cls_to_wrap {name!r} is not a gemma_hf layer class "
                                "(use GemmaDecoderLayer)")
    distributed = config.get("distributed_type")
    if distributed == "FSDP" and not fsdp:
        problems.append(f"{path}: distributed_type FSDP without fsdp_config")
    if distributed == "DEEPSPEED" and not config.get("deepspeed_config"):
        problems.append(f"{path}: distributed_type DEEPSPEED without deepspeed_config")
    if config.get("mixed_precision") == "fp16":
        problems.append(f"{path}: mixed_precision fp16 overflows Gemma 2/3; use bf16")
    return problems
