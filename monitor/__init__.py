"""hamta monitor: the mail service watched from outside, the way its clients reach it.

``monitor.config`` (monitor.toml) → ``monitor.checks`` (one observation per run) →
``monitor.verdicts`` (pure: the next state) → ``monitor.engine`` (schedules, records) →
``monitor.store`` (SQLite) and ``monitor.api`` (JSON, /metrics). docs/monitor.md is the
operator's account.
"""
