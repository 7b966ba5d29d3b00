// Live updates for runs still in progress: poll the JSON view of the run folders.
function fedsynthFmt(v, d) { return (v === null || v === undefined) ? "–" : Number(v).toPrecision(d || 4).replace(/\.?0+$/, ""); }

function fedsynthLiveIndex() {
  if (!document.querySelector("#runs tr.state-running, #runs tr.state-evaluating")) return;
  const tick = async () => {
    let runs;
    try { runs = await (await fetch("/api/runs", {cache: "no-store"})).json(); }
    catch (e) { setTimeout(tick, 5000); return; }  // a restart or a file mid-write: try again
    if (!Array.isArray(runs)) { setTimeout(tick, 5000); return; }
    let live = false;
    for (const r of runs) {
      const row = document.querySelector(`#runs tr[data-run="${CSS.escape(r.name)}"]`);
      if (!row) { location.reload(); return; }
      row.className = "state-" + r.state;
      row.querySelector(".status .badge").textContent = r.state;
      row.querySelector(".status .badge").className = "badge " + r.state;
      row.querySelector(".eps").textContent = Object.entries(r.epsilon).map(([s, e]) => `${s} ${fedsynthFmt(e, 3)}`).join(", ");
      live = live || r.state === "running" || r.state === "evaluating";
    }
    if (live) setTimeout(tick, 3000);
  };
  setTimeout(tick, 3000);
}

function fedsynthLiveRun(name) {
  const base = "/runs/" + encodeURIComponent(name);
  const tick = async () => {
    let p;
    try {
      const reply = await fetch("/api" + base + "/progress", {cache: "no-store"});
      if (!reply.ok) throw new Error(reply.status);
      p = await reply.json();
    } catch (e) { setTimeout(tick, 5000); return; }  // a restart or a file mid-write: try again
    document.getElementById("state").textContent = p.state;
    document.getElementById("state").className = "badge " + p.state;
    document.getElementById("rounds").textContent = `${p.rounds_done} / ${p.rounds_total ?? "–"} rounds`;
    const body = document.querySelector("#sites-progress tbody");
    body.innerHTML = "";
    for (const [site, v] of Object.entries(p.sites)) {
      const tr = document.createElement("tr");
      tr.dataset.site = site;
      for (const cell of [site, fedsynthFmt(v.epsilon), fedsynthFmt(v.epsilon_budget), v.rounds_trained ?? "–",
                          (v.declined_rounds || []).join(", ") || "–", (v.rejected_rounds || []).join(", ") || "–"]) {
        const td = document.createElement("td");
        td.textContent = cell;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    for (const which of ["epsilon", "loss"]) {
      const reply = await fetch(`${base}/convergence/${which}.svg`, {cache: "no-store"}).catch(() => null);
      if (reply && reply.ok) document.getElementById("plot-" + which).innerHTML = await reply.text();  // our own SVG
    }
    if (p.state === "running" || p.state === "evaluating") setTimeout(tick, 3000); else location.reload();
  };
  setTimeout(tick, 3000);
}
