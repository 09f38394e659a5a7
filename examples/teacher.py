"""The teacher panel's backend: a teacher asks the shared teacher assistant to prepare a meeting.

It takes the teacher's thread of the shared assistant `asst_teacher` (`[profile.teacher]` in
app/assistants.toml) with the gateway's get-or-create, `POST /v1/assistants/asst_teacher/thread`
(a new thread the first time, the same one after), adds the message `/ptm <student and topic>`
(a shortcut the gateway expands to a full prompt), runs it with the student's facts in the
gateway's `context` field, and prints the reply. The stored message keeps what was typed;
the gateway's `expanded_content` field shows what the shortcut became.

Against a local gateway (simulated mode, embedded Postgres, when nothing is configured):

    ENVIRONMENT=development .venv/bin/python -m app serve
    # in another shell:
    KEY=$(.venv/bin/python -m app create-key --user alice --tier free | tail -n 1)
    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=$KEY .venv/bin/python examples/teacher.py
"""

import sys
import warnings

import openai
from openai.types.beta import Thread

# The SDK marks the Assistants API deprecated; the gateway keeps serving it.
warnings.filterwarnings("ignore", category=DeprecationWarning)

STUDENT = {"name": "Maya", "class": "5B", "recent_grades": {"reading": "B+", "maths": "A-", "science": "B"}}
TYPED = "/ptm Maya, reading comprehension"


def main() -> None:
    client = openai.OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment

    # The gateway's get-or-create: the teacher's latest thread of this assistant, or a new one.
    thread = client.post(
        "/assistants/asst_teacher/thread",
        body={},
        cast_to=Thread,
        options={"headers": {"OpenAI-Beta": "assistants=v2"}},
    )
    sent = client.beta.threads.messages.create(thread.id, role="user", content=TYPED)
    run = client.beta.threads.runs.create_and_poll(
        thread_id=thread.id,
        assistant_id="asst_teacher",
        extra_body={"context": STUDENT},
        poll_interval_ms=500,
    )
    print(f"thread {thread.id} run {run.id} {run.status}")
    if run.status != "completed":
        sys.exit(f"the run ended {run.status}: {run.last_error}")

    for reply in client.beta.threads.messages.list(thread.id, run_id=run.id):
        text = "".join(part.text.value for part in reply.content if part.type == "text")
        print(f"assistant: {text}")

    stored = client.beta.threads.messages.retrieve(sent.id, thread_id=thread.id)
    typed = "".join(part.text.value for part in stored.content if part.type == "text")
    print(f"stored as typed: {typed}")
    print(f"expanded to: {getattr(stored, 'expanded_content', None)}")


if __name__ == "__main__":
    main()
