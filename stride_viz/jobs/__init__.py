"""Background jobs: a SQLite job table, an executor that starts detached worker processes,
and the job kinds (demo, attribute, continuation, sleep).

    from stride_viz.jobs import LocalProcessExecutor
    ex = LocalProcessExecutor()                       # table at data_home()/jobs.sqlite
    job_id = ex.submit("demo", {})
    ex.store.get(job_id).state                        # queued -> running -> done
"""
from .executor import Executor, LocalProcessExecutor
from .kinds import KINDS, demo_params_from_env, query_id_for, stage_position
from .store import ACTIVE_STATES, FINAL_STATES, STATES, Job, JobError, JobStore

__all__ = ["Executor", "LocalProcessExecutor", "Job", "JobStore", "JobError", "KINDS", "STATES",
           "ACTIVE_STATES", "FINAL_STATES", "query_id_for",
           "demo_params_from_env", "stage_position"]
