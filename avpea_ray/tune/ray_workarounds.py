"""Workarounds for Ray Tune / Ray Train behaviour this project cannot live with, in one place.

Each names the Ray issue it works around and reads Ray internals as they are in the Ray
versions below; on another Ray version a warning says so once, and each can be deleted when
its issue is fixed:

- `ResumableASHA`: `Tuner.restore` brings the scheduler back as it was created, so ASHA's rung
  records are lost and restored trials are never stopped
  (https://github.com/ray-project/ray/issues/30838).
- `remove_orphaned_placement_groups` / `ReleaseStoppedTrials` / `release_ended_trials`: a
  placement group whose creator actor died lives until the whole job ends; Ray Train V2's
  detached cleaner fails without the state API (https://github.com/ray-project/ray/issues/65881,
  https://github.com/ray-project/ray/issues/62753), so stopped trials' workers kept their CPUs.
"""
from __future__ import annotations

import json
import logging
import time

import ray
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from ..data import storage

TESTED_RAY_VERSIONS = ("2.60.",)
_log = logging.getLogger(__name__)
_warned: set[str] = set()


def check_ray_version(workaround: str) -> None:
    """Warn once per workaround when Ray is not a version its internals were read from."""
    import ray

    if not ray.__version__.startswith(TESTED_RAY_VERSIONS) and workaround not in _warned:
        _warned.add(workaround)
        _log.warning("%s reads Ray internals as in Ray %s; this is Ray %s: check it still works "
                     "(see avpea_ray/tune/ray_workarounds.py)", workaround, "/".join(TESTED_RAY_VERSIONS),
                     ray.__version__)

class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive a restored sweep.

    `Tuner.restore` brings the scheduler back as it was created, with empty rungs: restored
    trials would never be compared with those that already ran (and so never stopped). This
    one keeps its rungs in `state_url` (JSON, local or object storage), rewritten whenever a
    trial is recorded at a rung, and reads them back on first use. (It reads ASHA's brackets,
    `_brackets[i]._rungs` = [(milestone, {trial_id: score})], as in Ray 2.60.)
    """

    def __init__(self, state_url: str, **kwargs):
        super().__init__(**kwargs)
        self._state_url, self._loaded = state_url, False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        check_ray_version("ResumableASHA")
        if storage.exists(self._state_url):
            saved = json.loads(storage.read_bytes(self._state_url))
            for bracket, rungs in zip(self._brackets, saved["brackets"]):
                for (_, recorded), (_, values) in zip(bracket._rungs, rungs):
                    recorded.update(values)

    def _recorded(self) -> int:
        return sum(len(recorded) for bracket in self._brackets for _, recorded in bracket._rungs)

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        before = self._recorded()
        action = super().on_trial_result(tune_controller, trial, result)
        if self._recorded() != before:
            brackets = [[[milestone, recorded] for milestone, recorded in b._rungs] for b in self._brackets]
            storage.atomic_write_bytes(self._state_url, json.dumps({"brackets": brackets}).encode())
        return action


def remove_orphaned_placement_groups() -> int:
    """Release the Train workers' resources of trials that ended without their Train controller
    shutting down: what ASHA stopping a trial does (Tune kills the trial driver, and with it
    the controller), so that the trials after it can start.

    Ray keeps a placement group whose creator actor died until the whole job ends; Ray Train
    V2 removes its workers' one from a detached "PlacementGroupCleaner" actor, which finds the
    cluster through the state API and fails whenever that cannot: no dashboard (local Ray as
    in the tests), several local Ray instances or a stale /tmp/ray/ray_current_cluster, or
    RAY_ADDRESS=local. Measured here: 3 stopped trials' worker groups left the 2-CPU demo
    sweep waiting forever. This removes, in this job only, every live placement group whose
    creator was an actor that is now dead (the driver's own groups, e.g. Tune's per-trial
    ones, have no creator actor and are left alone). It reads the GCS placement-group table
    through Ray's internal GlobalState accessor (as in Ray 2.60).

    Returns:
        How many placement groups were removed.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for info in _actor_created_groups("remove_orphaned_placement_groups"):
        if info.creator_actor_dead:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(info.placement_group_id)))
            removed += 1
    return removed


def release_ended_trials(timeout_s: float = 60.0) -> int:
    """At a sweep's end, when every trial has ended: `remove_orphaned_placement_groups` until no
    placement group of this job's actors is left (or `timeout_s` passes), since a stopped trial's
    Train controller may still be dying when Tune returns (under load its worker group outlived a
    single clean-up call and held its CPUs until the job ended).

    Returns:
        How many placement groups were removed.
    """
    deadline = time.monotonic() + timeout_s
    removed = remove_orphaned_placement_groups()
    while (next(_actor_created_groups("release_ended_trials"), None) is not None
           and time.monotonic() < deadline):
        time.sleep(0.5)
        removed += remove_orphaned_placement_groups()
    return removed


def _actor_created_groups(caller: str):
    """The live placement groups of this job created by an actor (a Train controller's worker
    groups), as GCS records."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    check_ray_version(caller)
    job = ray.get_runtime_context().get_job_id()
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (info.state != gcs_pb2.PlacementGroupTableData.REMOVED and not info.is_detached
                and info.creator_job_id.hex() == job and not ray.ActorID(info.creator_actor_id).is_nil()):
            yield info


class ReleaseStoppedTrials(Callback):
    """Tune callback: `remove_orphaned_placement_groups` every few seconds of the sweep (at the
    end of Tune's control-loop steps)."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s, self._last = interval_s, 0.0

    def on_step_end(self, iteration: int, trials: list, **info):
        if time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            try:
                removed = remove_orphaned_placement_groups()
            except Exception as err:  # noqa: BLE001 - never fail a sweep over the clean-up
                print(f"sweep: could not check for orphaned placement groups: {err}")
                return
            if removed:
                print(f"sweep: released the Train workers' resources of {removed} stopped trial(s)")

