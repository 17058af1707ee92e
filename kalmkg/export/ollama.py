"""An Ollama Modelfile for an export: the GGUF, a Go TEMPLATE equivalent to the model's Hugging Face chat
template (found by rendering sentinel messages through it, not by parsing Jinja), and the stop strings
that end an assistant turn."""

from __future__ import annotations

import json

from kalmkg.prompts import SYSTEM_NO_CONTEXT


def modelfile(tokenizer, name: str) -> str:
    """An Ollama Modelfile: the GGUF, a Go TEMPLATE equivalent to the model's chat template, stop tokens."""
    roles = chat_roles(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    if roles is not None and bos and roles["start"].startswith(bos) and _adds_bos(tokenizer):
        roles["start"] = roles["start"][len(bos):]  # llama.cpp / Ollama add the BOS token themselves
    lines = [f"# kalmkg export of {name}: ollama create {name} -f {name}.Modelfile", f"FROM ./{name}.gguf", ""]
    if roles is None:
        lines += ['TEMPLATE """{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"""']
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    else:
        lines += [f'TEMPLATE """{go_template(roles)}"""']
        stops = stop_strings(tokenizer, roles)
    # Ollama asks the model alone, without the graph's facts: the system prompt of `kalmkg ask --no-context`,
    # the one question-form training wrote its turns with (not the base's own default, e.g. SmolLM2's)
    lines += [f'SYSTEM """{SYSTEM_NO_CONTEXT}"""']
    lines += [""] + [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def _adds_bos(tokenizer) -> bool:
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return False
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def chat_roles(tokenizer) -> dict[str, str] | None:
    """The text around each role's content in the HF chat template, found by rendering sentinels.

    Rendering (not parsing Jinja) works for any template that wraps each message independently
    (ChatML, Llama 2/3, Mistral, Gemma, Phi ...); None when the tokenizer has no usable template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    S, U, A, U2 = "\x01SYS\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01USER2\x01"

    def render(messages, gen=False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    try:
        u = render([{"role": "user", "content": U}])
        ug = render([{"role": "user", "content": U}], gen=True)
        ua = render([{"role": "user", "content": U}, {"role": "assistant", "content": A}])
        uau = render([{"role": "user", "content": U}, {"role": "assistant", "content": A},
                      {"role": "user", "content": U2}])
    except Exception:
        return None
    if not (ug.startswith(u) and ua.startswith(u) and uau.startswith(ua)):
        return None
    user_turn = uau[len(ua):]
    if U2 not in user_turn:
        return None
    user_pre, user_suf = user_turn.split(U2, 1)
    asst_turn = ua[len(u):]
    if A not in asst_turn:
        return None
    asst_pre, asst_suf = asst_turn.split(A, 1)
    roles = {"user_pre": user_pre, "user_suf": user_suf, "asst_pre": asst_pre, "asst_suf": asst_suf,
             "gen": ug[len(u):], "sys_pre": "", "sys_suf": "", "default_system": "", "start": ""}
    # What the template writes before the first user turn when there is no system message: nothing, a
    # start text written once (a BOS such as <|begin_of_text|>), or a default system message.
    head = u[: u.find(user_pre + U)] if (user_pre + U) in u else ""
    try:
        su = render([{"role": "system", "content": S}, {"role": "user", "content": U}])
    except Exception:  # templates that reject a system role (the Go template then wraps it as a user turn)
        su = None
    if su and S in su and (user_pre + U) in su:
        before, after = su.split(S, 1)
        sys_suf = after[: after.find(user_pre + U)]
        if head and before.startswith(head):  # written once at the start, not part of the system turn
            roles["start"], roles["sys_pre"] = head, before[len(head):]
        else:
            roles["sys_pre"] = before
            if head.startswith(before) and head.endswith(sys_suf) and len(head) > len(before) + len(sys_suf):
                roles["default_system"] = head[len(before): len(head) - len(sys_suf)]  # Modelfile SYSTEM
            else:
                roles["start"] = head
        roles["sys_suf"] = sys_suf
    else:
        roles["start"] = head
    return roles


def _go_literal(text: str) -> str:
    """Text for a Go template: actions start with '{{', so such text is emitted through an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(r: dict[str, str]) -> str:
    # No whitespace-trimming markers ({{- -}}): the role texts' own newlines must survive.
    L = _go_literal
    system = (f'{{{{ if eq .Role "system" }}}}{L(r["sys_pre"])}{{{{ .Content }}}}{L(r["sys_suf"])}'
              if r["sys_pre"] or r["sys_suf"] else
              f'{{{{ if eq .Role "system" }}}}{L(r["user_pre"])}{{{{ .Content }}}}{L(r["user_suf"])}')
    return (f'{L(r["start"])}{{{{ range $i, $_ := .Messages }}}}'
            f'{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}'
            f'{system}'
            f'{{{{ else if eq .Role "user" }}}}{L(r["user_pre"])}{{{{ .Content }}}}{L(r["user_suf"])}'
            f'{{{{ else if eq .Role "assistant" }}}}{L(r["asst_pre"])}{{{{ .Content }}}}{L(r["asst_suf"])}'
            f'{{{{ end }}}}'
            f'{{{{ if and $last (ne .Role "assistant") }}}}{L(r["gen"])}{{{{ end }}}}'
            f'{{{{ end }}}}')


def stop_strings(tokenizer, r: dict[str, str]) -> list[str]:
    """End of an assistant turn, EOS, and special tokens that open a new turn."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
                if getattr(t, "special", False)}
    stops: list[str] = []
    for candidate in (r["asst_suf"].strip(), tokenizer.eos_token or "",
                      *[s for s in sorted(special, key=len, reverse=True) if s and s in r["user_pre"]]):
        if candidate and candidate not in stops:
            stops.append(candidate)
    return stops
