"""The zoo app's backend: each animal is an assistant, and a visitor's question streams its answer.

It makes an assistant per animal (a lion and a penguin), starts a thread for each visitor
question, streams the run and prints the answer as it arrives, then deletes the assistants.
Its event handler handles only `thread.message.delta`, `thread.run.completed` and
`thread.run.failed`, as the app does.

Against a local gateway (simulated mode, embedded Postgres, when nothing is configured):

    ENVIRONMENT=development .venv/bin/python -m app serve
    # in another shell:
    KEY=$(.venv/bin/python -m app create-key --user alice --tier free | tail -n 1)
    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=$KEY .venv/bin/python examples/zoo.py
"""

import sys
import warnings

import openai
from openai import AssistantEventHandler
from openai.types.beta import AssistantStreamEvent

# The SDK marks the Assistants API deprecated; the gateway keeps serving it.
warnings.filterwarnings("ignore", category=DeprecationWarning)

ANIMALS = {
    "lion": (
        "Leo the lion",
        "You are Leo, the lion at the city zoo, talking with a child. Answer in two short, friendly sentences.",
    ),
    "penguin": (
        "Pip the penguin",
        "You are Pip, a gentoo penguin at the city zoo, talking with a child. Answer in two short sentences.",
    ),
}
QUESTIONS = [("lion", "How loud can you roar?"), ("penguin", "Why can't you fly?")]


class Visitor(AssistantEventHandler):
    """Prints the answer as it streams in and remembers how the run ended."""

    def __init__(self) -> None:
        super().__init__()
        self.outcome = ""

    def on_event(self, event: AssistantStreamEvent) -> None:
        if event.event == "thread.message.delta":
            for part in event.data.delta.content or []:
                if part.type == "text" and part.text and part.text.value:
                    print(part.text.value, end="", flush=True)
        elif event.event == "thread.run.completed":
            print()
            self.outcome = "completed"
        elif event.event == "thread.run.failed":
            print(f"\n(the run failed: {event.data.last_error})")
            self.outcome = "failed"


def main() -> None:
    client = openai.OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment

    assistants = {}
    for animal, (name, instructions) in ANIMALS.items():
        assistant = client.beta.assistants.create(model="default-chat", name=name, instructions=instructions)
        print(f"created {assistant.id} ({name})")
        assistants[animal] = assistant.id

    failed = 0
    try:
        for animal, question in QUESTIONS:
            thread = client.beta.threads.create(messages=[{"role": "user", "content": question}])
            print(f"visitor to the {animal}: {question}")
            print(f"{animal}: ", end="", flush=True)
            handler = Visitor()
            with client.beta.threads.runs.stream(
                thread_id=thread.id, assistant_id=assistants[animal], event_handler=handler
            ) as stream:
                stream.until_done()
            print(f"run on {thread.id}: {handler.outcome}")
            failed += handler.outcome != "completed"
    finally:
        for assistant_id in assistants.values():
            client.beta.assistants.delete(assistant_id)
            print(f"deleted {assistant_id}")
    if failed:
        sys.exit(f"{failed} run(s) did not complete")


if __name__ == "__main__":
    main()
