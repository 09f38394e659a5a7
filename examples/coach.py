"""The wellness coach's backend: the Swift app sends the user's message here, and this asks the coach.

It uses the shared assistant `asst_coach` (`[profile.coach]` in app/assistants.toml), adds the
user's message to a new thread, starts a run with what the app knows about the user as
additional instructions, polls the run until it ends and prints the coach's reply.

Against a local gateway (simulated mode, embedded Postgres, when nothing is configured):

    ENVIRONMENT=development .venv/bin/python -m app serve
    # in another shell:
    KEY=$(.venv/bin/python -m app create-key --user alice --tier free | tail -n 1)
    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=$KEY .venv/bin/python examples/coach.py
"""

import sys
import time
import warnings

import openai

# The SDK marks the Assistants API deprecated; the gateway keeps serving it.
warnings.filterwarnings("ignore", category=DeprecationWarning)

USER_CONTEXT = "The user is Sam. Goal: sleep seven hours a night. Streak: four evening walks this week."
QUESTION = "I slept badly again last night. What could I try this evening?"


def main() -> None:
    client = openai.OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment

    thread = client.beta.threads.create()
    client.beta.threads.messages.create(thread.id, role="user", content=QUESTION)
    run = client.beta.threads.runs.create(
        thread_id=thread.id, assistant_id="asst_coach", additional_instructions=USER_CONTEXT
    )
    while run.status in ("queued", "in_progress", "cancelling"):
        time.sleep(0.5)
        run = client.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    print(f"thread {thread.id} run {run.id} {run.status}")
    if run.status != "completed":
        sys.exit(f"the run ended {run.status}: {run.last_error}")

    for message in client.beta.threads.messages.list(thread.id, order="asc"):
        if message.role == "assistant":
            text = "".join(part.text.value for part in message.content if part.type == "text")
            print(f"coach: {text}")


if __name__ == "__main__":
    main()
