"""The Chat tab: talk to RWKV-7. Each browser session holds its own conversation in a gr.State, so a turn
feeds the model only that turn's new tokens: the RNN state already carries everything said before. Replies
go through the app's engine, where the users chatting at once share batched steps."""
from __future__ import annotations

import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import gradio as gr

from rwkv_lm.chat import CHAT_DEFAULTS, ChatSession
from rwkv_lm.serve import Engine

from .arena import format_bytes
from .inputs import (MAX_MESSAGE_CHARS, UserError, check_message, check_system_prompt, named_errors,
                     sampling_params)

# A fast model makes hundreds of pieces a second; the page redraws at most this often.
UPDATE_EVERY_S = 0.05
BUSY = "Still answering the last message: press Stop first."
NO_STATE = "none"  # the tuned-state choice that starts from zeros
# the sampling controls, as the API names them
SETTINGS = ("max_tokens", "temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "seed")


@dataclass
class Conversation:
    """One user's chat: the session (replying through the shared engine) and what the page shows."""

    session: ChatSession
    system: str  # as typed; a different one starts a new conversation
    tuned: str  # the tuned state it started from ("none": zeros); another one starts a new conversation
    device_lock: threading.Lock  # the engines': the session's own model calls (a fork) take turns too
    empty_state_bytes: int  # an RWKV state's size, shown before a reply has measured one
    history: list[dict] = field(default_factory=list)
    before_last_turn: ChatSession | None = None  # for Regenerate
    last_message: str | None = None
    # one change at a time: a click on Regenerate or Clear while a reply streams cancels that reply, and
    # must wait for it to let go of the session
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def start(cls, engine: Engine, system: str, device_lock: threading.Lock, tuned: str = NO_STATE,
              states: dict | None = None) -> "Conversation":
        # the system prompt is read by the engine (in its turn on the device), from the tuned state under its cache key
        session = ChatSession(engine.model, engine.tokenizer, system=system.strip() or None,
                              state=(states or {}).get(tuned), engine=engine)
        return cls(session, system, tuned, device_lock, engine.model.init_state(1).nbytes)

    def status(self) -> str:
        reply = self.session.last_reply
        state_bytes = reply.state_bytes if reply is not None and reply.state_bytes else self.empty_state_bytes
        return f"state: {format_bytes(state_bytes)}, {self.session.num_tokens:,} tokens"

    def cancel(self) -> None:
        """Stop the reply that streams, if any, without waiting (its row is freed within one engine iteration;
        the reply's reader lets go of the session)."""
        reply = self.session.last_reply
        if reply is not None:
            reply.close(wait=False)

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    @contextmanager
    def _exclusive(self):
        if not self.lock.acquire(timeout=10):
            raise UserError(BUSY)
        try:
            yield
        finally:
            self.lock.release()

    def turn(self, message: str, params):
        """Stream the reply to `message` into `history`, yielding after each piece; closing stops the model."""
        with self._exclusive():
            yield from self._stream(message, params)

    def regenerate(self, params):
        """Take back the last turn and stream a new reply to its message."""
        with self._exclusive():
            if self.before_last_turn is None:
                raise UserError("There is no reply to regenerate yet.")
            self.session, self.history = self.before_last_turn, self.history[:-2]
            yield from self._stream(self.last_message, params)

    def clear(self):
        """Forget everything said; the system prompt stays."""
        with self._exclusive():
            self.session.reset()
            self.history, self.before_last_turn, self.last_message = [], None, None

    def _stream(self, message, params):
        with self.device_lock:  # a fork feeds the last reply's final token
            self.before_last_turn = self.session.fork()
        self.last_message = message
        self.history = self.history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield
        with closing(self.session.reply(message, params)) as reply:
            for piece in reply:
                self.history[-1] = {"role": "assistant", "content": self.history[-1]["content"] + piece}
                yield


def throttled(updates):
    """The updates, skipping those that come within UPDATE_EVERY_S of the last one passed on."""
    shown = float("-inf")
    for update in updates:
        if time.monotonic() - shown >= UPDATE_EVERY_S:
            shown = time.monotonic()
            yield update


def render(engine: Engine, name: str, device_lock: threading.Lock, states: dict | None = None,
           start_state: str | None = None) -> None:
    """Lay out the tab and wire its events, inside an open gr.Blocks. `engine`: a started one, of RWKV-7;
    `states`: name -> tuned state a conversation may start from (`start_state` chosen at first)."""
    states = states or {}
    conversation = gr.State(None)
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label=name, height=460, placeholder=f"Say something to {name}.", buttons=["copy_all"])
            message = gr.Textbox(placeholder="Message (Enter to send)", label="Message", show_label=False, lines=1,
                                 max_length=MAX_MESSAGE_CHARS, autofocus=True)
            with gr.Row():
                send = gr.Button("Send", variant="primary")
                stop = gr.Button("Stop", variant="stop")
                regenerate = gr.Button("Regenerate")
                clear = gr.Button("Clear")
            status = gr.Markdown("state: empty, 0 tokens", label="Status", elem_id="chat-status")
        with gr.Column(scale=1):
            system = gr.Textbox("", label="System prompt (optional)", lines=3, max_length=MAX_MESSAGE_CHARS,
                                placeholder="Changing it starts a new conversation.")
            tuned = gr.Dropdown([NO_STATE, *states], value=start_state or NO_STATE, label="Start from a tuned state",
                                info="made by state tuning (train/README.md); changing it starts a new conversation",
                                interactive=bool(states))
            with gr.Accordion("Sampling", open=True):
                controls = [
                    gr.Slider(1, 1024, value=CHAT_DEFAULTS.max_tokens, step=1, label="Max tokens", elem_id="chat-max-tokens"),
                    gr.Slider(0, 2, value=CHAT_DEFAULTS.temperature, step=0.05, label="Temperature (0: greedy)",
                              elem_id="chat-temperature"),
                    gr.Slider(0.05, 1, value=CHAT_DEFAULTS.top_p, step=0.05, label="Top p", elem_id="chat-top-p"),
                    gr.Slider(0, 200, value=CHAT_DEFAULTS.top_k, step=1, label="Top k (0: off)"),
                    gr.Slider(0, 2, value=CHAT_DEFAULTS.presence_penalty, step=0.05, label="Presence penalty"),
                    gr.Slider(0, 2, value=CHAT_DEFAULTS.frequency_penalty, step=0.05, label="Frequency penalty"),
                    gr.Number(-1, precision=0, minimum=-1, label="Seed (-1: random)", elem_id="chat-seed"),
                ]
                for control, name in zip(controls, SETTINGS):
                    named_errors(control, name)

    def check_chat(message, conv, system, *settings):
        check_message(message), check_system_prompt(system), sampling_params(*settings)
        if conv is not None and conv.busy:
            raise UserError(BUSY)

    def check_regenerate(conv, *settings):
        sampling_params(*settings)
        if conv is None or conv.before_last_turn is None:
            raise UserError("There is no reply to regenerate yet.")

    # the parameters are named for the API (the gr.State `conv` is not part of it)
    def chat(message, conv, system, max_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty, seed,
             tuned_state=NO_STATE):
        message, system = check_message(message), check_system_prompt(system)
        params = sampling_params(max_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty, seed)
        if tuned_state != NO_STATE and tuned_state not in states:
            raise UserError(f"No tuned state {tuned_state!r}; choose one of: {', '.join([NO_STATE, *states])}")
        if conv is None or conv.system != system or conv.tuned != tuned_state:
            if conv is not None and conv.history:
                gr.Info("The system prompt or the tuned state changed, so a new conversation starts.")
            conv = Conversation.start(engine, system, device_lock, tuned_state, states)
        box = ""  # the message box is emptied once, as the reply starts: what the user types meanwhile stays
        for _ in throttled(conv.turn(message, params)):
            yield conv.history, conv, box, conv.status()
            box = gr.skip()
        yield conv.history, conv, box, conv.status()  # the last pieces, and tokens that ended the reply unseen

    def regenerate_last(conv, max_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty, seed):
        params = sampling_params(max_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty, seed)
        if conv is None:
            raise UserError("There is no reply to regenerate yet.")
        conv.cancel()  # the reply streaming now, even one still waiting for a row
        for _ in throttled(conv.regenerate(params)):
            yield conv.history, conv, conv.status()
        yield conv.history, conv, conv.status()

    def stop_reply(conv):
        if conv is not None:
            conv.cancel()

    def clear_all(conv):
        if conv is None:
            return [], None, "state: empty, 0 tokens"
        conv.cancel()
        conv.clear()
        return [], conv, conv.status()

    # In the page, inputs are checked by a step with no outputs, so a bad one is a toast and the chat stays as it
    # was (an error in the streaming step would cover the chat with an error badge). API calls go straight to
    # the streaming step, which checks them again. Regenerate and Clear cancel a running reply instead.
    chat_event = gr.on([message.submit, send.click], check_chat, [message, conversation, system, *controls], None,
                       api_visibility="private").success(
        chat, [message, conversation, system, *controls, tuned], [chatbot, conversation, message, status],
        api_name="chat", concurrency_id="models")
    regenerate_event = regenerate.click(check_regenerate, [conversation, *controls], None,
                                        api_visibility="private").success(
        regenerate_last, [conversation, *controls], [chatbot, conversation, status],
        api_name="regenerate", concurrency_id="models", cancels=[chat_event])
    replies = [chat_event, regenerate_event]
    # cancelling an event closes its handler once it next yields; closing the stream ends the reply at once
    stop.click(stop_reply, conversation, None, api_visibility="private", cancels=replies)
    clear.click(clear_all, conversation, [chatbot, conversation, status], api_name="clear", cancels=replies)
    chatbot.clear(clear_all, conversation, [chatbot, conversation, status], api_visibility="private", cancels=replies)
