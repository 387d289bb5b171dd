"""`byok-token USER [--role admin] [--ttl SECONDS]`: print a signed token (JWT HS256) for USER.

It signs with AUTH_JWT_SECRET from the environment (the same local default as the services), so a
token printed here is accepted by the chat and credit services of the same deployment.
"""

from __future__ import annotations

import typer

from services.chat.identity import mint_token
from services.shared.settings import HttpSettings

cli = typer.Typer(add_completion=False, help=__doc__)


@cli.command()
def mint(
    user_id: str = typer.Argument(..., help="the user id (the token's `sub`)"),
    role: str = typer.Option("user", help='"user" or "admin" (admin routes such as grants)'),
    ttl: int = typer.Option(3600, help="seconds until the token expires"),
) -> None:
    if role not in ("user", "admin"):
        raise typer.BadParameter('role is "user" or "admin"')
    typer.echo(mint_token(HttpSettings().auth_jwt_secret, user_id, role=role, ttl_s=ttl))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
