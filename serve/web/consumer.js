// The consumer page: one photo (+ optional age, sex, body site, consent) -> POST v1/classify and v1/saliency.
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
      reference.replaceChildren(document.createTextNode("Reference number: "), el("code", { id: "reference-id", text: body.upload_id }),
        document.createTextNode(". A dermatologist may review this photo to improve DermAID; quote this number if you contact us."));
      reference.hidden = false;
    } else if (consent) {
      notStored.textContent = "The photo could not be stored for review this time; the result above is still complete.";
      notStored.hidden = false;
    } else {
      notStored.textContent = "Nothing was stored: you did not tick the consent box.";
      notStored.hidden = false;
    }
    $("result").hidden = false;
  }

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
