// The mmft search page: one query, the baseline and the chosen tenant side by side, each result
// marked with its rank in the other column. Plain DOM code; every text goes in through textContent.
"use strict";

const $ = (sel) => document.querySelector(sel);
const BASELINE = "baseline";
let lastQuery = null;
let tenantInfo = new Map();

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const token = $("#token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

function status(text, isError) {
  const el = $("#status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function answer(response) {
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

async function loadTenants() {
  try {
    const data = await answer(await fetch("/tenants", { headers: headers(false) }));
    const select = $("#tenant");
    const previous = select.value;
    select.textContent = "";
    tenantInfo = new Map(data.tenants.map((t) => [t.name, t]));
    const names = data.tenants.map((t) => t.name);
    names.sort((a, b) => (a === BASELINE) - (b === BASELINE) || a.localeCompare(b));
    for (const name of names) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      select.appendChild(option);
    }
    if (names.includes(previous)) select.value = previous;
    status(names.length ? "" : "no tenant is open to this token", !names.length);
  } catch (e) {
    status("could not list the tenants: " + e.message, true);
  }
}

function columnsFor(tenant) {
  const compare = $("#compare").checked && tenant !== BASELINE;
  return compare ? [BASELINE, tenant] : [tenant];
}

async function runQuery(query) {
  const tenant = $("#tenant").value;
  if (!tenant) return status("pick a tenant first", true);
  const k = parseInt($("#k").value, 10) || 8;
  lastQuery = query;
  status("searching…");
  const t0 = performance.now();
  try {
    const names = columnsFor(tenant);
    const answers = await Promise.all(names.map((name) => search(name, query, k)));
    render(names.map((name, i) => ({ name, data: answers[i] })), query);
    status(`${answers[0].results.length} results in ${Math.round(performance.now() - t0)} ms`);
  } catch (e) {
    status(e.message, true);
  }
}

async function search(tenant, query, k) {
  if (query.kind === "text") {
    const body = JSON.stringify({ tenant, text: query.text, k, thumbnails: true });
    return answer(await fetch("/search/text", { method: "POST", headers: headers(true), body }));
  }
  const form = new FormData();
  form.append("tenant", tenant);
  form.append("k", String(k));
  form.append("target", query.target);
  form.append("thumbnails", "true");
  form.append("image", query.file);
  return answer(await fetch("/search/image", { method: "POST", headers: headers(false), body: form }));
}

function rankMap(results) {
  const ranks = new Map();
  for (const r of results) if (!ranks.has(r.key)) ranks.set(r.key, r.rank);
  return ranks;
}

function render(columns, query) {
  const root = $("#results");
  root.textContent = "";
  columns.forEach((col, i) => {
    const other = columns.length > 1 ? columns[1 - i] : null;
    const otherRanks = other ? rankMap(other.data.results) : null;
    const section = document.createElement("section");
    section.className = "column";
    section.dataset.tenant = col.name;
    const title = document.createElement("h2");
    const info = tenantInfo.get(col.name) || {};
    title.textContent = col.name === BASELINE ? "baseline: the frozen base model"
      : `${col.name}: adapter at LoRA scale ${info.lora_scale ?? "?"}`;
    section.appendChild(title);
    const grid = document.createElement("div");
    grid.className = "grid";
    for (const hit of col.data.results) grid.appendChild(card(col, hit, other, otherRanks, query));
    section.appendChild(grid);
    root.appendChild(section);
  });
}

function card(col, hit, other, otherRanks, query) {
  const el = document.createElement("div");
  el.className = "card result";
  el.dataset.key = hit.key;
  el.dataset.rank = hit.rank;
  const img = document.createElement("img");
  img.alt = hit.caption || hit.key;
  if (hit.thumbnail) img.src = hit.thumbnail;
  el.appendChild(img);
  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.textContent = `#${hit.rank}  ${hit.score.toFixed(3)}`;
  meta.appendChild(rank);
  if (other) {
    const mark = document.createElement("span");
    const there = otherRanks.get(hit.key);
    mark.className = "other-rank";
    mark.dataset.otherRank = there === undefined ? "" : String(there);
    if (there === undefined) {
      mark.textContent = `${other.name}: not in top ${other.data.k}`;
      mark.classList.add("new");
    } else {
      mark.textContent = `${other.name}: #${there}`;
      // green: the tuned model ranks this image higher than the baseline does; red: lower
      const tunedRank = col.name === BASELINE ? there : hit.rank;
      const baseRank = col.name === BASELINE ? hit.rank : there;
      if (there !== hit.rank) mark.classList.add(tunedRank < baseRank ? "up" : "down");
    }
    meta.appendChild(mark);
  }
  el.appendChild(meta);
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.textContent = hit.caption || hit.key;
  el.appendChild(caption);
  if (query.kind === "text") el.appendChild(feedbackButtons(col.name, hit, query.text));
  return el;
}

function feedbackButtons(tenant, hit, text) {
  const box = document.createElement("div");
  box.className = "feedback";
  for (const [label, relevant] of [["relevant", true], ["not relevant", false]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.addEventListener("click", async () => {
      const body = JSON.stringify({ tenant, query: text, key: hit.key, relevant, rank: hit.rank });
      try {
        await answer(await fetch("/feedback", { method: "POST", headers: headers(true), body }));
        button.classList.add("sent");
      } catch (e) {
        status("feedback not recorded: " + e.message, true);
      }
    });
    box.appendChild(button);
  }
  return box;
}

function imageQuery(file) {
  if (file) runQuery({ kind: "image", file, target: $("#target").value });
}

$("#text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("#query").value.trim();
  if (text) runQuery({ kind: "text", text });
});
const drop = $("#drop");
drop.addEventListener("click", (event) => { if (event.target === drop) $("#file").click(); });
drop.addEventListener("keydown", (event) => { if (event.key === "Enter") $("#file").click(); });
$("#file").addEventListener("change", (event) => imageQuery(event.target.files[0]));
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  imageQuery(event.dataTransfer.files[0]);
});
$("#token").addEventListener("change", loadTenants);
for (const id of ["#tenant", "#compare"]) {
  $(id).addEventListener("change", () => { if (lastQuery) runQuery(lastQuery); });
}
loadTenants();
