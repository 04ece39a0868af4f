// The consumer page: one photo (+ optional age, sex, body site, consent) -> POST v1/classify and v1/saliency;
// an earlier consented photo: reference + secret key -> GET / DELETE v1/uploads/{reference} (key in the header only).
"use strict";

(() => {
  const { config, errorMessage, networkMessage, el, renderBars, showError } = DermAID;
  const $ = (id) => document.getElementById(id);
  const form = $("check"), errorBox = $("error"), busy = $("busy"), submit = $("submit");
  let photo = null;          // the chosen File
  let photoUrl = null;       // its object URL (preview and result)
  let overlayUrl = null;

  for (const sex of config.sexes) $("sex").append(el("option", { value: sex, text: sex }));
  for (const site of config.sites) $("site").append(el("option", { value: site, text: site }));
  $("age").min = String(config.age_range[0]);
  $("age").max = String(config.age_range[1]);

  function choose(event) {
    const file = event.target.files && event.target.files[0];
    if (!file) return;
    photo = file;
    if (photoUrl) URL.revokeObjectURL(photoUrl);
    photoUrl = URL.createObjectURL(file);
    $("preview").src = photoUrl;
    $("preview").hidden = false;
    $("chosen").textContent = `Chosen: ${file.name || "photo"} (${Math.max(1, Math.round(file.size / 1024))} KB)`;
    showError(errorBox, "");
  }
  $("preview").addEventListener("error", () => { $("preview").hidden = true; });  // not an image the browser shows
  $("take").addEventListener("change", choose);
  $("choose").addEventListener("change", choose);

  function formData(extra = {}) {
    const data = new FormData();
    data.append("image", photo, photo.name || "photo.jpg");
    const age = $("age").value.trim();
    if (age !== "") data.append("age", age);
    if ($("sex").value) data.append("sex", $("sex").value);
    if ($("site").value) data.append("site", $("site").value);
    for (const [key, value] of Object.entries(extra)) data.append(key, value);
    return data;
  }

  function validate() {
    if (!photo) return "Please take or choose a photo first.";
    const age = $("age").value.trim();
    const [low, high] = config.age_range;
    if (age !== "" && !(Number(age) >= low && Number(age) <= high)) return `Age must be a number from ${low} to ${high}.`;
    return "";
  }

  // abstain: the photo does not look like the lesion photos the model knows; no diagnosis, no triage, no overlay
  function showAnswer(body) {
    const abstained = body.abstain === true, triage = $("triage");
    $("retake").textContent = abstained ? body.message : "";
    $("retake").hidden = !abstained;
    for (const id of ["triage", "overlay-figure", "ranking"]) $(id).hidden = abstained;
    if (abstained) {
      triage.className = "triage";
      triage.replaceChildren();
      $("bars").replaceChildren();
      return;
    }
    renderBars($("bars"), body.probabilities);
    triage.className = `triage ${body.triage.level}`;
    triage.replaceChildren(el("strong", { text: `Most likely: ${body.top.name} (${(100 * body.top.probability).toFixed(0)}%). ` }),
                           document.createTextNode(body.triage.message));
  }

  function showResult(body, consent) {
    showAnswer(body);
    $("photo").src = photoUrl;
    $("disclaimer").textContent = body.disclaimer;
    const reference = $("reference"), notStored = $("not-stored");
    reference.hidden = true;
    notStored.hidden = true;
    if (consent && body.stored && body.upload_id) {
      showReference(body.upload_id, body.lookup_token);
    } else if (consent && body.stored && body.duplicate) {
      notStored.textContent = "This photo was already stored for review earlier, so it was not stored again. " +
        "The reference and secret key were shown when it was first sent.";
      notStored.hidden = false;
    } else if (consent) {
      notStored.textContent = "The photo could not be stored for review this time; the result above is still complete.";
      notStored.hidden = false;
    } else {
      notStored.textContent = "Nothing was stored: you did not tick the consent box.";
      notStored.hidden = false;
    }
    $("result").hidden = false;
  }

  // The reference and the secret key, shown this once (the server keeps only a digest of the key); the form
  // below is filled in with both, so the person can check the review or delete the photo right away.
  function showReference(reference, key) {
    const box = $("reference");
    box.replaceChildren(
      el("p", {}, [document.createTextNode("Reference: "), el("code", { id: "reference-id", text: reference })]),
      el("p", {}, [document.createTextNode("Secret key: "), el("code", { id: "reference-key", text: key || "" })]),
      el("p", { class: "hint", text: "Copy both, or write them down, now: the key is shown only this once and cannot " +
        "be recovered. With them you can see what the dermatologists said, or delete the photo, under " +
        "“Check or delete an earlier photo”." }),
      el("p", { text: "A dermatologist may review this photo to improve DermAID; quote the reference if you contact us." }));
    box.hidden = false;
    $("lookup-ref").value = reference;
    $("lookup-key").value = key || "";
  }

  // The privacy note says how long this server keeps a photo (storage.retention_days, from v1/privacy).
  async function loadPrivacy() {
    try {
      const response = await fetch("v1/privacy");
      if (response.ok) $("retention").textContent = (await response.json()).how_long;
    } catch (_) { /* the note keeps its default words */ }
  }
  loadPrivacy();

  // --- an earlier photo: reference + secret key -> its review state, or its deletion ---------------------------
  const STATES = { waiting_for_review: "Waiting for review", reviewed: "Reviewed", not_reviewable: "Not reviewable" };
  const NOT_FOUND = "No photo matches this reference and secret key. Check both (a deleted photo is gone for good).";

  function lookupInput() {
    const reference = $("lookup-ref").value.trim(), key = $("lookup-key").value.trim();
    if (!reference || !key) { showError($("lookup-error"), "Please enter the reference and the secret key."); return null; }
    showError($("lookup-error"), "");
    return { reference, key };
  }

  async function callUpload(method, input) {
    const response = await fetch(`v1/uploads/${encodeURIComponent(input.reference)}`,
      { method, headers: { Authorization: `Bearer ${input.key}` }, cache: "no-store" });
    if (response.status === 404) throw new Error(NOT_FOUND);
    if (!response.ok) throw new Error(await errorMessage(response, true));
    return response.json();
  }

  function showLookup(title, body) {
    $("lookup-state").replaceChildren(el("strong", { text: title }));
    $("lookup-message").textContent = body.message;
    $("lookup-disclaimer").textContent = body.disclaimer || config.disclaimer;
    $("lookup-disclaimer").hidden = false;
    $("lookup-result").hidden = false;
  }

  async function lookupAction(action) {
    const input = lookupInput();
    $("lookup-result").hidden = true;
    if (!input) return;
    if (action === "DELETE" && !window.confirm("Delete this photo and everything stored with it? This cannot be undone.")) return;
    for (const id of ["lookup-check", "lookup-delete"]) $(id).disabled = true;
    try {
      const body = await callUpload(action, input);
      if (action === "DELETE") {
        showLookup("Deleted", body);
        $("lookup-key").value = "";
      } else {
        const title = body.state === "reviewed" ? `Reviewed: ${body.class.name}` : STATES[body.state] || body.state;
        showLookup(title, body);
      }
    } catch (error) {
      showError($("lookup-error"), error instanceof TypeError ? networkMessage() : error.message);
    } finally {
      for (const id of ["lookup-check", "lookup-delete"]) $(id).disabled = false;
    }
  }

  $("lookup").addEventListener("submit", (event) => { event.preventDefault(); lookupAction("GET"); });
  $("lookup-delete").addEventListener("click", () => lookupAction("DELETE"));

  // target: the class the result shows (a compressed model's float explainer may rank classes differently).
  // The overlay is the photo scaled down to at most overlay_max_side px (2048) on its long side (body.width x
  // body.height), not the photo's own size: the figure's CSS box (app.css `figure img`) shows it over the same area
  // as the photo, so no full-size overlay is asked for (full_size stays off) and a 413 for a photo over the
  // saliency pixel limit is shown in the caption, the result above it complete.
  async function loadOverlay(target) {
    const caption = $("overlay-caption"), overlay = $("overlay");
    caption.textContent = "Where the model looked (loading…)";
    overlay.removeAttribute("src");
    try {
      const response = await fetch("v1/saliency", { method: "POST", body: formData({ format: "json", target }) });
      if (!response.ok) { caption.textContent = `Overlay unavailable: ${await errorMessage(response, true)}`; return; }
      const body = await response.json();
      const bytes = Uint8Array.from(atob(body.overlay_png_base64), (c) => c.charCodeAt(0));
      if (overlayUrl) URL.revokeObjectURL(overlayUrl);
      overlayUrl = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
      overlay.src = overlayUrl;
      caption.textContent = `Where the model looked for “${body.name}”`;
    } catch (_) {
      caption.textContent = "Overlay unavailable: " + networkMessage();
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const problem = validate();
    showError(errorBox, problem);
    if (problem) return;
    const consent = $("consent").checked;
    submit.disabled = true;
    busy.hidden = false;
    $("result").hidden = true;
    try {
      const response = await fetch("v1/classify", { method: "POST", body: formData({ consent: consent ? "true" : "false" }) });
      if (!response.ok) { showError(errorBox, `Could not check the photo. ${await errorMessage(response, true)}`); return; }
      const result = await response.json();
      showResult(result, consent);
      $("result").scrollIntoView({ block: "start", behavior: "smooth" });
      if (result.abstain !== true) await loadOverlay(result.top.code);  // no overlay for a photo it refused
    } catch (_) {
      showError(errorBox, networkMessage());
    } finally {
      submit.disabled = false;
      busy.hidden = true;
    }
  });
})();
