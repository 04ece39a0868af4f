// The dermatologist page: bearer token -> queue (refused photos, ties, then the most uncertain) -> one upload ->
// a label (class, confidence, advice). Blinded review (the server's review.blinded, default on): the model's answer,
// its saliency map and the other reviewers' labels are asked for only after this reviewer's label is saved.
"use strict";

(() => {
  const { config, names, errorMessage, networkMessage, el, renderBars, showError } = DermAID;
  const $ = (id) => document.getElementById(id);
  const errorBox = $("error");
  const TOKEN_KEY = "dermaid-review-token";
  const CHOICE_TEXT = {
    confidence: { low: "Low", medium: "Medium", high: "High" },
    advice: { none: "No visit needed", visit: "In-person visit", biopsy: "Biopsy" },
  };
  let current = null;        // the upload shown (its blinded or revealed view)
  let photo = null;          // its image blob (the saliency request sends it)
  let navigation = 0;        // bumped by every view change: a queue answer arriving after one is dropped
  const objectUrls = [];

  for (const c of config.classes) $("filter").append(el("option", { value: c.code, text: `${c.code} – ${c.name}` }));
  radios($("codes"), "code", config.review_codes, (code) => `${code} – ${names[code]}`);
  radios($("confidence"), "confidence", config.confidence_levels, (value) => CHOICE_TEXT.confidence[value] || value);
  radios($("advice"), "advice", config.advice, (value) => CHOICE_TEXT.advice[value] || value);
  $("comment").maxLength = config.max_comment_chars;

  function radios(box, name, values, text) {
    for (const value of values) {
      const input = el("input", { type: "radio", name, value, required: "" });
      box.append(el("label", {}, [input, document.createTextNode(text(value))]));
    }
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

  // fetch with the bearer token; an API error becomes an Error carrying a readable message.
  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${token()}` } });
    } catch (_) {
      throw new Error(networkMessage());
    }
    if (!response.ok) {
      const error = new Error(await errorMessage(response));
      error.status = response.status;
      throw error;
    }
    return response;
  }

  function show(section) {
    for (const id of ["signin", "queue", "item"]) $(id).hidden = id !== section;
  }

  function fail(error) {
    showError(errorBox, error.message);
    if (error.status === 401 || error.status === 403) { sessionStorage.removeItem(TOKEN_KEY); show("signin"); }
  }

  async function signIn() {
    const body = await (await api("v1/review/me")).json();
    $("who").textContent = `Signed in as ${body.reviewer}`;
    $("who").hidden = false;
    showError(errorBox, "");
    await loadQueue();
  }

  const metaText = (metadata) => [metadata.age != null ? `age ${metadata.age}` : null, metadata.sex, metadata.site]
    .filter(Boolean).join(", ") || "no metadata";

  async function loadQueue() {
    const mine = ++navigation;
    const filter = $("filter").value;
    const query = new URLSearchParams({ limit: "50" });
    if (filter) query.set("top_class", filter);
    const body = await (await api(`v1/review/queue?${query}`)).json();
    if (mine !== navigation) return;  // the reviewer opened an item (or asked again) meanwhile: keep that view
    $("filter-label").hidden = body.blinded;   // filtering by the model's class would show it
    const list = $("queue-list");
    list.replaceChildren();
    $("queue-count").textContent = body.total
      ? `${body.total} upload(s) waiting: photos the model could not assess first, then ties, then the most uncertain.`
      : "No uploads waiting for your review.";
    for (const item of body.items) list.append(el("li", {}, [queueEntry(item)]));
    show("queue");
    if ($("stats").open) loadStats().catch(fail);
  }

  // One queue entry. Blinded (no prediction in the item): no class and no uncertainty, only whether the model could
  // assess the photo at all; a tie says a further opinion is needed, never which codes tie.
  function queueEntry(item) {
    const refused = item.model_refused === true;
    const when = new Date(item.created).toLocaleString();
    let top, hint;
    if (item.prediction) {
      const best = item.prediction.probabilities[0];
      top = refused ? `Model refused: unlike its training photos (best guess ${best.name})`
                    : `Model: ${best.name} ${(100 * best.probability).toFixed(0)}%`;
      hint = `uncertainty ${item.prediction.entropy.toFixed(2)} · ${metaText(item.metadata)} · ${when}`;
    } else {
      top = refused ? "Photo the model could not assess (unlike its training photos)" : `Photo · ${metaText(item.metadata)}`;
      hint = `${refused ? `${metaText(item.metadata)} · ` : ""}${when}`;
    }
    const classes = [refused ? "refused" : "", item.needs_tiebreak ? "tie" : ""].filter(Boolean).join(" ");
    const children = [el("div", { class: "top", text: top })];
    if (item.needs_tiebreak) children.push(el("div", { class: "flag", text: `Tie between ${item.reviewers} reviewers: a further opinion is needed` }));
    children.push(el("div", { class: "hint", text: hint }));
    const button = el("button", { type: "button", "data-id": item.id, class: classes }, children);
    button.addEventListener("click", () => openItem(item.id).catch(fail));
    return button;
  }

  function blobUrl(blob) {
    const url = URL.createObjectURL(blob);
    objectUrls.push(url);
    return url;
  }

  async function openItem(id) {
    ++navigation;
    while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
    const body = await (await api(`v1/review/uploads/${encodeURIComponent(id)}`)).json();
    for (const input of document.querySelectorAll("#label-form input")) input.checked = false;
    $("comment").value = "";
    $("saved").textContent = "";
    $("item-photo").removeAttribute("src");
    photo = null;
    renderItem(body);
    show("item");
    showError(errorBox, "");
    photo = await (await api(`v1/review/uploads/${encodeURIComponent(id)}/image`)).blob();
    $("item-photo").src = blobUrl(photo);
    if (body.revealed) loadOverlay().catch(() => {});
  }

  // The item as the server gave it: before this reviewer's label (blinded) the photo and its metadata only.
  function renderItem(body) {
    current = body.upload;
    $("item-id").textContent = current.id;
    const rows = [["Age", current.metadata.age ?? "not given"], ["Sex", current.metadata.sex || "not given"],
                  ["Body site", current.metadata.site || "not given"], ["Uploaded", new Date(current.created).toLocaleString()]];
    if (current.prediction) {
      rows.push(["Model", current.model_version], ["Uncertainty", `${current.prediction.entropy.toFixed(3)} nats`]);
    }
    rows.push(["Familiarity", oodText(current)]);
    const meta = $("item-meta");
    meta.replaceChildren();
    for (const [key, value] of rows) meta.append(el("dt", { text: key }), el("dd", { text: String(value) }));
    $("tiebreak").hidden = !body.needs_tiebreak || body.revealed;
    $("blind-note").hidden = body.revealed;
    $("reveal").hidden = !body.revealed;
    $("item-overlay-figure").hidden = !body.revealed;
    $("item-overlay").removeAttribute("src");
    document.querySelector("#item .images").classList.toggle("single", !body.revealed);
    if (body.revealed) {
      renderBars($("item-bars"), current.prediction.probabilities);
      renderHistory(body.labels, body.agreement);
    } else {
      $("item-bars").replaceChildren();
      $("history").replaceChildren();
      $("agreement").textContent = "";
    }
  }

  // The OOD detector's decision in words (null: the model had no detector when the photo was uploaded).
  function oodText(upload) {
    if (upload.model_refused == null) return "not measured (model without an OOD detector)";
    if (!upload.prediction) {
      return upload.model_refused ? "refused: unlike the model's training photos (no reliable answer)"
                                  : "the model answered (shown after your label)";
    }
    const score = upload.prediction.ood_score.toFixed(3);
    return upload.model_refused ? `refused: unlike the model's training photos (OOD score ${score}); its answer is unreliable`
                                : `answered (OOD score ${score})`;
  }

  async function loadOverlay() {
    const caption = $("item-overlay-caption"), overlay = $("item-overlay");
    overlay.removeAttribute("src");
    caption.textContent = "Saliency (loading…)";
    const data = new FormData();
    data.append("image", photo, "upload");
    if (current.metadata.age != null) data.append("age", String(current.metadata.age));
    if (current.metadata.sex) data.append("sex", current.metadata.sex);
    if (current.metadata.site) data.append("site", current.metadata.site);
    data.append("target", current.prediction.top_class);
    data.append("format", "json");
    let response;
    try { response = await fetch("v1/saliency", { method: "POST", body: data }); } catch (_) { caption.textContent = networkMessage(); return; }
    if (!response.ok) { caption.textContent = `Saliency unavailable: ${await errorMessage(response)}`; return; }
    const body = await response.json();
    const bytes = Uint8Array.from(atob(body.overlay_png_base64), (c) => c.charCodeAt(0));
    overlay.src = blobUrl(new Blob([bytes], { type: "image/png" }));
    caption.textContent = `Saliency for ${body.target} (${body.method})`;
  }

  function renderHistory(labels, agreement) {
    const list = $("history");
    list.replaceChildren();
    for (const label of labels) {
      const extra = [label.confidence && `${label.confidence} confidence`, label.advice && `advice: ${label.advice}`,
                     label.blinded && "chosen blinded"].filter(Boolean).join(", ");
      const text = `${label.code} – ${names[label.code] || ""} · ${label.reviewer} · ${new Date(label.created).toLocaleString()}`
        + (extra ? ` · ${extra}` : "") + (label.comment ? ` · “${label.comment}”` : "");
      list.append(el("li", { text }));
    }
    $("agreement").textContent = agreement.reviewers
      ? `${agreement.reviewers} reviewer(s); agreement ${(100 * agreement.agreement).toFixed(0)}%; `
        + (agreement.consensus ? `consensus ${agreement.consensus}.` : "no consensus (tie): a further reviewer is asked.")
      : "No labels yet.";
  }

  // The reviewer-statistics panel: agreement beyond chance (Cohen's kappa per pair, Krippendorff's alpha overall).
  async function loadStats() {
    const body = await (await api("v1/review/stats")).json();
    const alpha = body.overall.alpha;
    $("stats-overall").textContent = `${body.uploads} upload(s) reviewed, ${body.multi_reviewed} by two or more, `
      + `${body.ties} tie(s). Krippendorff's α ${alpha == null ? "not defined yet" : alpha.toFixed(2)} `
      + `over ${body.overall.units} upload(s) (reviewers per upload vary, so α rather than Fleiss' κ).`;
    const reviewers = $("stats-reviewers").tBodies[0];
    reviewers.replaceChildren();
    for (const [name, r] of Object.entries(body.reviewers)) {
      reviewers.append(row([name, r.uploads, r.blinded, `${r.confidence.low} / ${r.confidence.medium} / ${r.confidence.high}`,
                            `${r.advice.visit} / ${r.advice.biopsy}`]));
    }
    const pairs = $("stats-pairs").tBodies[0];
    pairs.replaceChildren();
    for (const p of body.pairs) {
      pairs.append(row([p.reviewers.join(" – "), p.shared, `${(100 * p.observed_agreement).toFixed(0)}%`,
                        p.cohen_kappa == null ? "not defined" : p.cohen_kappa.toFixed(2)]));
    }
  }

  const row = (cells) => el("tr", {}, cells.map((value) => el("td", { text: String(value) })));

  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    signIn().catch(fail);
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("who").hidden = true;
    show("signin");
  });
  $("refresh").addEventListener("click", () => loadQueue().catch(fail));
  $("stats").addEventListener("toggle", () => { if ($("stats").open) loadStats().catch(fail); });  // on demand: it reads every label
  $("filter").addEventListener("change", () => loadQueue().catch(fail));
  $("back").addEventListener("click", () => loadQueue().catch(fail));

  $("label-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = (name) => document.querySelector(`#label-form input[name="${name}"]:checked`);
    if (!chosen("code") || !chosen("confidence") || !chosen("advice")) {
      showError(errorBox, "Please choose a diagnosis (or “not a lesion / unusable”), your confidence and your advice.");
      return;
    }
    try {
      const id = encodeURIComponent(current.id);
      await (await api(`v1/review/uploads/${id}/labels`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ code: chosen("code").value, confidence: chosen("confidence").value,
                               advice: chosen("advice").value, comment: $("comment").value || null, source: "web" }),
      })).json();
      const body = await (await api(`v1/review/uploads/${id}`)).json();   // revealed now: this reviewer has labelled it
      renderItem(body);
      if (photo) loadOverlay().catch(() => {});
      $("saved").textContent = `Saved: ${chosen("code").value}.`;
      showError(errorBox, "");
    } catch (error) {
      fail(error);
    }
  });

  if (token()) signIn().catch(fail); else show("signin");
})();
