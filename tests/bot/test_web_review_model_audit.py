"""The model registry's audited actions on the moderators' web page (SQLite and PostgreSQL): the audit log lists
and filters them; an action asked from a server is seen by that server's moderators, one from the command line
(no server) only by the operator; the CSV carries them."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from store.models import OPERATOR_MODERATOR, SYSTEM_MODERATOR, ModAction
from store.repository import ModelAudit
from tests.bot.webkit import GUILD_A, GUILD_B, MOD_A, OPERATOR, make_app, make_service, sign_in

ACTIONS = ("model_train", "model_promote", "model_rollback", "model_reject")


async def _registry_history(repo) -> None:
    await repo.register_checkpoint("base", "/base")
    await repo.set_active_checkpoint("base")
    await repo.register_checkpoint("round-1", "/r1", parent_id="base")
    await repo.create_training_run("feedback", input_checkpoint_id="base", by=ModelAudit(4242, GUILD_A))
    await repo.reject_checkpoint("round-1", {"gate": {"promote": False}}, by=ModelAudit(SYSTEM_MODERATOR, GUILD_A),
                                 reason="the gate rejected it (bias)")
    await repo.set_active_checkpoint("round-1", force=True, by=ModelAudit(OPERATOR_MODERATOR),
                                     note="forced: the gate rejected it")
    await repo.set_active_checkpoint("base", by=ModelAudit(4343, GUILD_B), action=ModAction.MODEL_ROLLBACK,
                                     note="rolled back from round-1")


async def test_web_audit_log_shows_model_actions_to_those_who_may_see_them(repo, tmp_path):
    await _registry_history(repo)
    svc, _ = make_service(repo, tmp_path)
    client = TestClient(TestServer(make_app(svc)))
    await client.start_server()
    try:
        await sign_in(client, repo, OPERATOR)
        everything = await (await client.get("/audit")).text()
        for action in ACTIONS:
            assert f"<option >{action}</option>" in everything or f"<option>{action}</option>" in everything
            filtered = await client.get(f"/audit?action={action}")
            assert filtered.status == 200, action
            assert f"<td>{action}</td>" in await filtered.text(), action
        promoted = await (await client.get("/audit?action=model_promote")).text()
        assert "checkpoint round-1 (was base); forced: the gate rejected it" in promoted
        assert "<td>model_rollback</td>" not in promoted
        csv_text = await (await client.get("/audit.csv?action=model_reject")).text()
        assert f",{GUILD_A},{SYSTEM_MODERATOR},model_reject,,,checkpoint round-1; the gate rejected it (bias)" \
            in csv_text
        await sign_in(client, repo, MOD_A)  # a moderator of guild A: its admin's training and the gate's verdict
        mine = await (await client.get("/audit")).text()
        assert "<td>model_train</td>" in mine and "<td>model_reject</td>" in mine
        assert "<td>model_promote</td>" not in mine and "<td>model_rollback</td>" not in mine
    finally:
        await client.close()


def test_the_operator_has_one_id_in_every_front_end():
    """The command line's audit rows (``python -m training feedback``, which cannot import the bot) name the same
    operator as the terminal and the web page's operator link."""
    from bot.terminal import TERMINAL_USER_ID
    from bot.web.cli import OPERATOR_ID

    assert TERMINAL_USER_ID == OPERATOR_ID == OPERATOR_MODERATOR == OPERATOR.user_id
