"""Holding the login roles of a restore that must not serve yet (a replica with redaction:
features §2.6, issue 15).

A restore's own server is reachable before its switchover (the operator's per-restore
Service, `pgro run`'s loopback port), and the analytics and extra users get their passwords
when it is provisioned. Until it is redacted, those roles are `NOLOGIN` and their sessions
are ended, so no one reads unredacted data through them; the redaction step lets them in
again (`LOGIN`) once the data is masked. The bootstrap superuser and pgro's admin role are
never held: pgro's own work goes through them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from pgro.postgres.session import connect

APPLICATION: Final = "pgro-login-hold"
DATABASE: Final = "postgres"


class LoginHoldFailed(Exception):
    """The roles' LOGIN could not be changed; the message names roles, never a password."""


def set_login(conninfo_for: Callable[[str], str], roles: Sequence[str], *, login: bool) -> None:
    """`ALTER ROLE … LOGIN` or `NOLOGIN` for each of `roles` that exists; with NOLOGIN, their
    open sessions are ended too (a role's attribute binds new sessions only)."""
    import psycopg
    from psycopg import sql

    try:
        with connect(conninfo_for(DATABASE), application_name=APPLICATION) as conn:
            conn.execute("SET default_transaction_read_only = off")
            present = [
                str(r[0])
                for r in conn.execute(
                    "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname = ANY(%s) "
                    "AND NOT rolsuper ORDER BY 1",
                    (list(roles),),
                ).fetchall()
            ]
            attribute = sql.SQL("LOGIN" if login else "NOLOGIN")
            for role in present:
                conn.execute(sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(role), attribute))
            if not login and present:
                conn.execute(
                    "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
                    "WHERE usename = ANY(%s) AND pid <> pg_catalog.pg_backend_pid()",
                    (present,),
                )
    except psycopg.Error as error:
        state = getattr(error, "sqlstate", None) or type(error).__name__
        what = "let in" if login else "hold"
        raise LoginHoldFailed(
            f"cannot {what} the login roles {', '.join(roles)} ({state})"
        ) from None
