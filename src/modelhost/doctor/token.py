"""The Hugging Face token (`doctor.hf.token`, `doctor.hf.token-missing`).

The token in use is the one the gateway would send (`hubtoken.resolve_token`: the
environment's, else the one stored in the cache). Hub tokens are `hf_` followed by letters
and digits (34 today; 30 or more is accepted). With `HF_ENDPOINT` pointing at another
server (a mirror) the shape is not checked: other hubs make other tokens. The token is
shown only masked (`hubtoken.mask`: at most its last four characters).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from modelhost.checks.report import Finding
from modelhost.doctor.context import Context, failed, names, not_applicable, passed
from modelhost.doctor.rules import HF_TOKEN, HF_TOKEN_MISSING
from modelhost.hubtoken import mask, resolve_token, token_info

HUB_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")
HUB_HOSTS = frozenset({"huggingface.co", "hf.co"})


def check_token(ctx: Context) -> list[Finding]:
    cache = ctx.settings.model_cache_dir
    token = resolve_token(ctx.settings.huggingface_token, cache)
    downloads = [n for n in ctx.needs if n.from_hub and n.download_bytes != 0]
    findings = []
    if token is None:
        findings.append(not_applicable(HF_TOKEN, "no Hugging Face token is set"))
        if downloads:
            findings.append(failed(
                HF_TOKEN_MISSING, f"no Hugging Face token, and still to download from the hub: "
                                  f"{names(downloads)}; gated or private repositories need one",
                "set HF_TOKEN (or `modelhost token set`) with a token from "
                "https://huggingface.co/settings/tokens"))
        else:
            findings.append(not_applicable(HF_TOKEN_MISSING, "no configured model is still "
                                                             "to download from the hub"))
        return findings
    info = token_info(ctx.settings.huggingface_token, cache)
    shown = f"{mask(token)} (from the {info.source})"
    endpoint = ctx.host.environ.get("HF_ENDPOINT", "")
    host = (urlsplit(endpoint).hostname or "") if endpoint else "huggingface.co"
    if host not in HUB_HOSTS:
        findings.append(passed(HF_TOKEN, f"token {shown} for HF_ENDPOINT {endpoint}: its "
                                         "shape is not checked for a mirror"))
    elif HUB_TOKEN.fullmatch(token):
        findings.append(passed(HF_TOKEN, f"token {shown} is well-formed"))
    else:
        findings.append(failed(
            HF_TOKEN, f"the Hugging Face token {shown} is malformed: hub tokens are 'hf_' "
                      "followed by 30 or more letters and digits",
            "copy the token again from https://huggingface.co/settings/tokens (no quotes, "
            "spaces or line breaks) into HF_TOKEN, or `modelhost token set`"))
    findings.append(passed(HF_TOKEN_MISSING, f"a token is set ({mask(token)})"))
    return findings
