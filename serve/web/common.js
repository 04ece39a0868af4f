// Shared by the DermAID pages: the config the server put in the page, API errors as readable text, bars.
"use strict";

const DermAID = (() => {
  const config = JSON.parse(document.getElementById("dermaid-config").textContent);
  const names = Object.fromEntries(config.classes.map((c) => [c.code, c.name]));
  names[config.not_a_lesion] = "Not a lesion / unusable";

  // Plain words for the API's error codes that a consumer may meet (anything else: the API's own message).
  const FRIENDLY = {
    unsupported_media_type: "This file is not a photo DermAID can read. Please choose a JPEG, PNG or WebP photo.",
    undecodable_image: "This photo could not be read (the file may be damaged). Please try another photo.",
    empty_image: "The chosen file is empty. Please choose a photo.",
    image_too_large: "The photo has too many pixels. Please choose a smaller photo.",
    body_too_large: "The photo file is too large. Please choose a smaller photo.",
  };

  // An API error response -> one sentence a person can act on.
  async function errorMessage(response, friendly = false) {
    let message = "", code = "";
    try {
      const body = await response.json();
      code = (body && body.error && body.error.code) || "";
      message = (body && body.error && body.error.message) || (body && body.detail && JSON.stringify(body.detail)) || "";
    } catch (_) { /* not JSON */ }
    if (friendly && FRIENDLY[code]) return FRIENDLY[code];
    const byStatus = {
      401: "Please sign in with your dermatologist token.",
      403: "This token is not a dermatologist token.",
      413: "The photo is too large.",
      415: "This file is not a supported image. Please send a JPEG or PNG photo.",
      429: "The server is busy. Please try again in a moment.",
      503: "The service is starting or busy. Please try again in a moment.",
    };
    if (!message) message = byStatus[response.status] || `The server answered with status ${response.status}.`;
    return message;
  }

  function networkMessage() {
    return "Could not reach the DermAID server. Check your connection and try again.";
  }

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "class") node.className = value; else if (key === "text") node.textContent = value; else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  // [{code, name, probability}] (most probable first) -> <li> rows with bars.
  function renderBars(list, probabilities) {
    list.replaceChildren();
    for (const row of probabilities) {
      const pct = 100 * row.probability;
      const fill = el("div", { class: "fill" });
      fill.style.width = `${pct.toFixed(1)}%`;
      const track = el("div", { class: "track", role: "img", "aria-label": `${pct.toFixed(1)} percent` }, [fill]);
      list.append(el("li", { "data-code": row.code }, [
        el("span", { class: "name", text: `${row.name || names[row.code]} (${row.code})` }),
        track,
        el("span", { class: "pct", text: `${pct < 1 ? pct.toFixed(1) : pct.toFixed(0)}%` }),
      ]));
    }
  }

  function showError(box, message) {
    box.textContent = message;
    box.hidden = !message;
    if (message) box.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  return { config, names, errorMessage, networkMessage, el, renderBars, showError };
})();
