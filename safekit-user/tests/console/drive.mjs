// Drives the safekit console in headless Chromium (Debian's /usr/bin/chromium
// through playwright-core; no browser is ever downloaded). Run by
// safekit-user/tests/cluster_console.rs inside the lab's client namespace.
//
// Environment: SK_URL (https://node1:9453), SK_USER, SK_PASS, SK_SHOTS
// (screenshot directory), SK_PROFILE (a fresh --user-data-dir), SK_BAD_LINE
// (the line the configuration error must be reported at).
// Prints one "ok: ..." line per step; exits 1 at the first failure. After
// "waiting: kill node2" the test kills node2's daemon.

import { chromium } from "playwright-core";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const URL = env("SK_URL");
const SHOTS = env("SK_SHOTS");
const GREEN = "rgb(46, 157, 58)";

const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

function log(msg) { console.log(`ok: ${msg}`); }

// The computed background of node's cell once it shows state in green
// (a SECOND is orange while it resynchronises).
async function cell(page, node, state) {
  const sel = `td.state[data-node="${node}"][data-module="web"][data-state="${state}"][data-colour="green"]`;
  // Found and read in one evaluation: live updates redraw the table.
  const colour = await page.waitForFunction((s) => {
    const el = document.querySelector(s);
    return el ? getComputedStyle(el).backgroundColor : null;
  }, sel, { timeout: 60000 });
  return colour.jsonValue();
}

async function runVerb(page, scope, node, label) {
  await page.selectOption(`${scope} select.verb[data-node="${node}"][data-module="web"]`, { label });
  await page.click(`${scope} button.run[data-node="${node}"][data-module="web"]`);
  await page.waitForSelector("#confirm[open]", { timeout: 5000 });
  await page.click("#confirm-yes");
}

let page = null;

async function main() {
  const context = await chromium.launchPersistentContext(env("SK_PROFILE"), {
    executablePath: process.env.SK_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: FLAGS,
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 900 },
  });
  page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => { console.log(`page error: ${e.message}`); process.exitCode = 1; });

  // 1. Log in.
  await page.goto(URL);
  await page.fill("#login-user", env("SK_USER"));
  await page.fill("#login-password", "wrong password");
  await page.click("#login-submit");
  await page.waitForFunction(() => document.querySelector("#login-error")?.textContent.includes("wrong"));
  log("a wrong password is refused on the login form");
  await page.fill("#login-password", env("SK_PASS"));
  await page.click("#login-submit");
  await page.waitForSelector("table#cluster", { timeout: 10000 });
  log("logged in");

  // 2. Both nodes' states in their colours.
  const c1 = await cell(page, "node1", "PRIM");
  const c2 = await cell(page, "node2", "SECOND");
  if (c1 !== GREEN || c2 !== GREEN) throw new Error(`colours ${c1} ${c2}, want ${GREEN}`);
  await page.screenshot({ path: `${SHOTS}/1-cluster.png`, fullPage: true });
  log(`node1 PRIM and node2 SECOND, both ${GREEN}`);

  // 3. Swap from the menu; the roles exchange live (no reload).
  await page.evaluate(() => { window.__noReload = true; });
  await runVerb(page, "#cluster", "node1", "swap");
  const s1 = await cell(page, "node1", "SECOND");
  const s2 = await cell(page, "node2", "PRIM");
  if (!(await page.evaluate(() => window.__noReload === true))) throw new Error("the page reloaded");
  if (s1 !== GREEN || s2 !== GREEN) throw new Error(`colours after swap ${s1} ${s2}`);
  await page.screenshot({ path: `${SHOTS}/2-swapped.png`, fullPage: true });
  log("swap from the menu: node1 SECOND, node2 PRIM, live");

  // 4. A full resynchronisation of node1 from the module page: its
  // progress bar advances.
  await page.click('a[href="#/module/web"]');
  await page.waitForSelector("#module-cards .card", { timeout: 10000 });
  await runVerb(page, "#module-cards", "node1", "stop");
  await page.waitForSelector('.badge[data-node="node1"][data-state="STOP"]', { timeout: 30000 });
  log("node1 stopped from the module page");
  await runVerb(page, "#module-cards", "node1", "second fullsync");
  const seen = [];
  let shot = false;
  const deadline = Date.now() + 90000;
  while (Date.now() < deadline) {
    const bars = await page.$$eval('progress.resync[data-active="true"]', (ps) =>
      ps.map((p) => [p.value, p.max]));
    for (const [v, m] of bars) {
      if (m > 1 && v > 0 && v < m && !seen.some((s) => s[0] === v)) seen.push([v, m]);
    }
    if (!shot && seen.length >= 2) {
      await page.screenshot({ path: `${SHOTS}/3-resync.png`, fullPage: true });
      shot = true;
    }
    const done = await page.$('.badge[data-node="node1"][data-state="SECOND"][data-colour="green"]');
    if (done && seen.length > 0) break;
    await page.waitForTimeout(100);
  }
  const increasing = seen.every((s, i) => i === 0 || s[0] > seen[i - 1][0]);
  if (seen.length < 3 || !increasing) {
    throw new Error(`resync progress not seen advancing: ${JSON.stringify(seen)}`);
  }
  await page.waitForSelector('.badge[data-node="node1"][data-state="SECOND"][data-colour="green"]', { timeout: 60000 });
  await page.waitForSelector('table.checkers tr[data-node="node2"][data-checker="tcp0"][data-up="true"]', { timeout: 10000 });
  await page.screenshot({ path: `${SHOTS}/4-resynced.png`, fullPage: true });
  log("the primary's tcp checker is shown up with its last result");
  log(`resync progress advanced through ${seen.length} values up to ${seen[seen.length - 1][0]} of ${seen[seen.length - 1][1]} bytes; node1 SECOND green`);

  // 5. A configuration error at its line.
  await page.click("#nav-config");
  const ta = 'textarea[data-path="modules/web/module.toml"]';
  await page.waitForSelector(ta, { timeout: 10000 });
  const text = await page.$eval(ta, (t) => t.value);
  if (!text.includes('pulse = "100ms"')) throw new Error(`unexpected module.toml: ${text}`);
  await page.fill(ta, text.replace('pulse = "100ms"', 'pulse = "fast"'));
  await page.click("#config-check");
  const want = env("SK_BAD_LINE");
  const li = `#config-errors li[data-file="modules/web/module.toml"][data-line="${want}"]`;
  await page.waitForSelector(li, { timeout: 10000 });
  const message = await page.$eval(li, (e) => e.textContent);
  if (!message.includes("heart.pulse")) throw new Error(`error text: ${message}`);
  await page.waitForSelector(`.editor[data-path="modules/web/module.toml"] .gutter span.err[data-line="${want}"]`);
  await page.screenshot({ path: `${SHOTS}/5-config-error.png`, fullPage: true });
  log(`configuration error reported at line ${want}: ${message}`);
  await page.click("#config-apply");
  await page.click("#confirm-yes");
  await page.waitForFunction(() => document.querySelector("#config-result")?.textContent.includes("not available"));
  log("apply answers that it is not available yet");

  // 6. A node whose daemon dies shows as unreachable, live.
  await page.click("#nav-cluster");
  await cell(page, "node2", "PRIM");
  console.log("waiting: kill node2");
  await page.waitForSelector('td.state[data-node="node2"][data-state="UNREACHABLE"]', { timeout: 30000 });
  const grey = await page.$eval('td.state[data-node="node2"][data-state="UNREACHABLE"]', (el) => getComputedStyle(el).backgroundColor);
  if (grey !== "rgb(138, 138, 138)") throw new Error(`unreachable colour ${grey}`);
  await page.waitForSelector('th[data-node="node2"] .node-down', { timeout: 5000 });
  await page.screenshot({ path: `${SHOTS}/6-node2-unreachable.png`, fullPage: true });
  log("node2's daemon killed: its column shows unreachable (grey), node1 still live");

  await context.close();
}

main().catch(async (e) => {
  console.log(`FAILED: ${e.stack || e}`);
  if (page) {
    try {
      await page.screenshot({ path: `${SHOTS}/failure.png`, fullPage: true });
      console.log(`page text: ${await page.$eval("body", (b) => b.innerText)}`);
    } catch (_) { /* the page is gone */ }
  }
  process.exit(1);
});
