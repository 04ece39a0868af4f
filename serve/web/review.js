// The dermatologist page: bearer token -> queue (most uncertain first) -> one upload -> a label.
"use strict";

(() => {
  const { config, names, errorMessage, networkMessage, el, renderBars, showError } = DermAID;
  const $ = (id) => document.getElementById(id);
  const errorBox = $("error");
  const TOKEN_KEY = "dermaid-review-token";
  let current = null;        // the upload shown
  const objectUrls = [];

  for (const c of config.classes) $("filter").append(el("option", { value: c.code, text: `${c.code} – ${c.name}` }));
  for (const code of config.review_codes) {
    const input = el("input", { type: "radio", name: "code", value: code, required: "" });
    $("codes").append(el("label", {}, [input, document.createTextNode(`${code} – ${names[code]}`)]));
  }
  $("comment").maxLength = config.max_comment_chars;

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

  async function loadQueue() {
    const filter = $("filter").value;
    const query = new URLSearchParams({ limit: "50" });
    if (filter) query.set("top_class", filter);
    const body = await (await api(`v1/review/queue?${query}`)).json();
    const list = $("queue-list");
    list.replaceChildren();
    $("queue-count").textContent = body.total
      ? `${body.total} upload(s) waiting: photos the model refused first, then the most uncertain.`
      : "No uploads waiting for your review.";
    for (const item of body.items) {
      const top = item.prediction.probabilities[0];
      const meta = [item.metadata.age != null ? `age ${item.metadata.age}` : null, item.metadata.sex, item.metadata.site]
        .filter(Boolean).join(", ") || "no metadata";
      const refused = item.prediction.abstain === true;
      const button = el("button", { type: "button", "data-id": item.id, class: refused ? "refused" : "" }, [
        el("div", { class: "top", text: refused ? `Model refused: unlike its training photos (best guess ${top.name})`
                                                : `Model: ${top.name} ${(100 * top.probability).toFixed(0)}%` }),
        el("div", { class: "hint", text: `uncertainty ${item.prediction.entropy.toFixed(2)} · ${meta} · ${new Date(item.created).toLocaleString()}` }),
      ]);
      button.addEventListener("click", () => openItem(item.id).catch(fail));
      list.append(el("li", {}, [button]));
    }
    show("queue");
  }

  function blobUrl(blob) {
    const url = URL.createObjectURL(blob);
    objectUrls.push(url);
    return url;
  }

  async function openItem(id) {
    while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
    const body = await (await api(`v1/review/uploads/${encodeURIComponent(id)}`)).json();
    current = body.upload;
    $("item-id").textContent = current.id;
    const meta = $("item-meta");
    meta.replaceChildren();
    const rows = [["Age", current.metadata.age ?? "not given"], ["Sex", current.metadata.sex || "not given"],
                  ["Body site", current.metadata.site || "not given"], ["Uploaded", new Date(current.created).toLocaleString()],
                  ["Model", current.model_version], ["Uncertainty", `${current.prediction.entropy.toFixed(3)} nats`],
                  ["Familiarity", oodText(current.prediction)]];
    for (const [key, value] of rows) meta.append(el("dt", { text: key }), el("dd", { text: String(value) }));
    renderBars($("item-bars"), current.prediction.probabilities);
    renderHistory(body.labels, body.agreement);
    for (const input of document.querySelectorAll("#codes input")) input.checked = false;
    $("comment").value = "";
    $("saved").textContent = "";
    show("item");
    showError(errorBox, "");
    const image = await (await api(`v1/review/uploads/${encodeURIComponent(id)}/image`)).blob();
    $("item-photo").src = blobUrl(image);
    loadOverlay(image).catch(() => {});
  }

  // The OOD detector's decision in words (null: the model had no detector when the photo was uploaded).
  function oodText(prediction) {
    if (prediction.abstain == null) return "not measured (model without an OOD detector)";
    const score = prediction.ood_score.toFixed(3);
    return prediction.abstain ? `refused: unlike the model's training photos (OOD score ${score}); its answer is unreliable`
                              : `answered (OOD score ${score})`;
  }

  async function loadOverlay(image) {
    const caption = $("item-overlay-caption"), overlay = $("item-overlay");
    overlay.removeAttribute("src");
    caption.textContent = "Saliency (loading…)";
    const data = new FormData();
    data.append("image", image, "upload");
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
      const text = `${label.code} – ${names[label.code] || ""} · ${label.reviewer} · ${new Date(label.created).toLocaleString()}`
        + (label.comment ? ` · “${label.comment}”` : "");
      list.append(el("li", { text }));
    }
    $("agreement").textContent = agreement.reviewers
      ? `${agreement.reviewers} reviewer(s); agreement ${(100 * agreement.agreement).toFixed(0)}%; `
        + (agreement.consensus ? `consensus ${agreement.consensus}.` : "no consensus (tie).")
      : "No labels yet.";
  }

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
  $("filter").addEventListener("change", () => loadQueue().catch(fail));
  $("back").addEventListener("click", () => loadQueue().catch(fail));

  $("label-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = document.querySelector("#codes input:checked");
    if (!chosen) { showError(errorBox, "Please choose a diagnosis (or “not a lesion / unusable”)."); return; }
    try {
      const response = await api(`v1/review/uploads/${encodeURIComponent(current.id)}/labels`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ code: chosen.value, comment: $("comment").value || null, source: "web" }),
      });
      await response.json();
      const history = await (await api(`v1/review/uploads/${encodeURIComponent(current.id)}/labels`)).json();
      renderHistory(history.labels, history.agreement);
      $("saved").textContent = `Saved: ${chosen.value}.`;
      showError(errorBox, "");
    } catch (error) {
      fail(error);
    }
  });

  if (token()) signIn().catch(fail); else show("signin");
})();
