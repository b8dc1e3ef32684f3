"""Floor 5: running a plan: the local engine, staging and publish, the resume journal, the
plan/run_task/finish steps, Ray, and the Hub-sourced tasks and ``--stream``."""
