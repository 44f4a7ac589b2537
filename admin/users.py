"""hq-admin user ... and keygen: the users of a server (ref. §6) and CURVE keys (README,
"Securing hq").

``add`` and ``new-token`` print the token once: it is stored only as a salted hash.
Permissions are ``@read``, ``@report``, ``@db-admin``, ``@user-admin``, ``@all`` (``@none``
for nothing); several go as separate words or comma-separated.
"""

from __future__ import annotations

from hq import curve

from . import output


def keygen(args, client) -> int:
    try:
        public, secret = curve.create(args.directory, args.name)
    except curve.BadKey as exc:
        output.error(str(exc))
        return output.FAILED
    output.emit(
        args,
        {"public": public, "secret": secret},
        (
            "",
            ["key", "file"],
            [("public (give it to clients and workers)", public), ("secret (0600)", secret)],
        ),
    )
    return output.OK


def _perm_words(words: list) -> list:
    return [w for word in words for w in word.replace(",", " ").split()]


def _user_rows(users: list) -> list:
    return [(u["username"], " ".join(u["permissions"]) or "@none") for u in users]


def add_commands(sub, common) -> None:
    cmd = sub.add_parser(
        "keygen",
        parents=[common],
        help="make a CURVE key pair: NAME.key (public) and NAME.key_secret, for the broker, "
        "a worker or a client",
    )
    cmd.add_argument("directory", metavar="DIR")
    cmd.add_argument("--name", default="broker", help="file name of the pair (default broker)")
    cmd.set_defaults(func=keygen, needs_server=False)

    group = sub.add_parser(
        "user", parents=[common], help="add, remove, show and list users; permissions; tokens"
    )
    users = group.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    cmd = users.add_parser("add", parents=[common], help="a new user; prints its token once")
    cmd.add_argument("username")
    cmd.add_argument("permissions", nargs="*", metavar="PERM", help="e.g. @read @report")
    cmd.set_defaults(func=add)
    cmd = users.add_parser("remove", parents=[common], help="delete a user (yourself if none is named)")
    cmd.add_argument("username", nargs="?")
    cmd.set_defaults(func=remove)
    cmd = users.add_parser("show", parents=[common], help="one user and its permissions (default: yourself)")
    cmd.add_argument("username", nargs="?")
    cmd.set_defaults(func=show)
    cmd = users.add_parser("list", parents=[common], help="every user and its permissions")
    cmd.set_defaults(func=list_users)
    cmd = users.add_parser("perms", parents=[common], help="replace a user's permissions")
    cmd.add_argument("username")
    cmd.add_argument("permissions", nargs="+", metavar="PERM", help="e.g. @read @report, or @none")
    cmd.set_defaults(func=perms)
    cmd = users.add_parser("new-token", parents=[common], help="a new token for a user (default: yourself)")
    cmd.add_argument("username", nargs="?")
    cmd.set_defaults(func=new_token)


def add(args, client) -> int:
    user = client.new_user(args.username, _perm_words(args.permissions))
    row = (*_user_rows([user])[0], user["token"])
    output.emit(args, user, ("", ["user", "permissions", "token (shown once)"], [row]))
    return output.OK


def remove(args, client) -> int:
    result = client.delete_user(args.username)
    output.emit(args, result, ("", ["removed"], [(result["username"],)]))
    return output.OK


def show(args, client) -> int:
    user = client.get_user(args.username)
    if user is None:
        output.error(f"no user named {args.username!r}")
        return output.FAILED
    output.emit(args, user, ("", ["user", "permissions"], _user_rows([user])))
    return output.OK


def list_users(args, client) -> int:
    users = client.get_all_users()
    output.emit(args, users, ("", ["user", "permissions"], _user_rows(users)))
    return output.OK


def perms(args, client) -> int:
    user = client.set_user_perms(args.username, _perm_words(args.permissions))
    output.emit(args, user, ("", ["user", "permissions"], _user_rows([user])))
    return output.OK


def new_token(args, client) -> int:
    result = client.refresh_token(args.username)
    output.emit(args, result, ("", ["user", "token (shown once)"], [(result["username"], result["token"])]))
    return output.OK
