// The operator console in a real browser (headless Chromium through
// playwright-core), against a running pipeline. Run by tests/console.rs,
// one phase at a time (the test changes the databases between them):
//   node tests/console/console.mjs PHASE BASE_URL TOKEN SCREENSHOT_DIR
// run:    the four demo maps are Not running; the customers map will
//         reject one row in its initial sync.
// rerun:  the row was fixed; rerun the initial sync, then pause customers.
// resume: changes queued while customers was paused; resume it.
// Exits non-zero, naming the step, when the console does not behave.
import { chromium } from "playwright-core";

const [phase, base, token, shots] = process.argv.slice(2);
const MAPS = ["customer_groups", "currencies", "customers", "contacts"];
let current = "starting";
const step = (s) => {
  current = s;
  console.log(`console-test: ${s}`);
};

function check(ok, what) {
  if (!ok) throw new Error(what);
}

const order = (page) =>
  page.$$eval("#order li", (items) => items.map((li) => li.dataset.map));

const states = (page) =>
  page.$$eval("tr[data-map]", (rows) =>
    Object.fromEntries(rows.map((r) => [r.dataset.map, r.querySelector("td[data-state]").dataset.state])),
  );

async function readOnly(page) {
  step("the maps page lists every map, read-only before signing in");
  await page.goto(base);
  // The console reads the maps' state from Kafka about once a second; the
  // table fills in live once the first read is done.
  await page.locator("tr[data-map]").first().waitFor({ timeout: 60_000 });
  const s = await states(page);
  check(MAPS.every((m) => s[m] === "Not running"), `states: ${JSON.stringify(s)}`);
  check((await page.locator("form[action='/command']").count()) === 0, "command forms shown to a reader");
  await page.screenshot({ path: `${shots}/maps.png`, fullPage: true });
}

async function signIn(page, tryWrong) {
  step("signing in with the operator token");
  await page.goto(`${base}/login`);
  if (tryWrong) {
    step("a wrong token is refused");
    await page.getByLabel(/Your name/).fill("Ana");
    await page.getByLabel("Operator token").fill("not-the-token");
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("alert").filter({ hasText: "not the operator token" }).waitFor();
  }
  await page.getByLabel(/Your name/).fill("Ana");
  await page.getByLabel("Operator token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("Signed in as operator Ana").waitFor();
}

async function refusedOrder(page) {
  step("a run in an order against the dependencies is refused with the reason");
  await page.locator("tr[data-map=contacts]").getByRole("link", { name: "Run…" }).click();
  const before = await order(page);
  check(JSON.stringify(before) === JSON.stringify(MAPS), `dialog order: ${before}`);
  // The keyboard-operable move: contacts above customers.
  await page.getByRole("button", { name: "Move contacts up" }).focus();
  await page.keyboard.press("Enter");
  check((await order(page))[2] === "contacts", `after moving up: ${await order(page)}`);
  await page.getByRole("button", { name: "Run", exact: true }).click();
  const notice = await page.locator("#notice").textContent();
  check(/refused: .*inconsistent order: `contacts` depends on `customers`/.test(notice), `notice: ${notice}`);
  const s = await states(page);
  check(MAPS.every((m) => s[m] === "Not running"), `a refused run changed states: ${JSON.stringify(s)}`);
}

async function runFromDialog(page) {
  step("the dialog runs contacts with its related maps in a chosen order and master");
  await page.locator("tr[data-map=contacts]").getByRole("link", { name: "Run…" }).click();
  // Drag currencies above customer_groups (neither depends on the other).
  await page
    .locator("li[data-map=currencies]")
    .dragTo(page.locator("li[data-map=customer_groups]"), { targetPosition: { x: 10, y: 2 } });
  const chosen = await order(page);
  const want = ["currencies", "customer_groups", "customers", "contacts"];
  check(JSON.stringify(chosen) === JSON.stringify(want), `dragged order: ${chosen}`);
  await page.getByLabel("Conflict master").selectOption("fno");
  check(await page.getByLabel(/Initial Sync/).isChecked(), "initial sync not ticked by default");
  await page.screenshot({ path: `${shots}/run-dialog.png`, fullPage: true });
  await page.getByRole("button", { name: "Run", exact: true }).click();
  const notice = await page.locator("#notice").textContent();
  check(/Run contacts: (completed|accepted)/.test(notice), `notice: ${notice}`);
}

async function live(page) {
  step("the table follows the maps to Running without a reload");
  await page.waitForFunction(
    (maps) => {
      const rows = [...document.querySelectorAll("tr[data-map]")];
      return maps.every((m) => rows.some((r) => r.dataset.map === m && r.querySelector("td[data-state]").dataset.state === "Running"));
    },
    MAPS,
    { timeout: 180_000, polling: 250 },
  );
  await page.screenshot({ path: `${shots}/maps-running.png`, fullPage: true });
  step("on a narrow screen the table stays readable");
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: `${shots}/maps-narrow.png`, fullPage: true });
}

async function details(page) {
  step("the initial sync details list the rejected row, with search");
  await page.goto(base);
  await page.locator("tr[data-map=customers]").getByRole("link", { name: "customers", exact: true }).click();
  await page.locator("#failed tr[data-key='[\"C9300\"]']").waitFor();
  const row = await page.locator("#failed tr[data-key='[\"C9300\"]']").textContent();
  check(/fno/.test(row) && /customers_v3/.test(row) && /create/.test(row) && /23514/.test(row), `failed row: ${row}`);
  await page.getByLabel("Search").fill("nothing like this");
  await page.getByRole("button", { name: "Show" }).click();
  check((await page.locator("#failed tbody tr").count()) === 0, "the search kept rows it does not match");
  await page.getByLabel("Search").fill("c9300");
  await page.getByRole("button", { name: "Show" }).click();
  check((await page.locator("#failed tbody tr").count()) === 1, "the search lost the row");
  await page.screenshot({ path: `${shots}/initial-sync-details.png`, fullPage: true });
}

async function mapping(page) {
  step("the mapping page shows the field pairs and the schema check");
  await page.getByRole("link", { name: "Mapping" }).click();
  const pair = page.locator("#fields tr", { hasText: "customeraccount" });
  check(/accountnumber/.test(await pair.textContent()), "customeraccount ↔ accountnumber not shown");
  check(/fits both tables/.test(await page.locator("#schema").textContent()), "schema check not shown");
  await page.screenshot({ path: `${shots}/mapping.png`, fullPage: true });
}

async function rerun(page) {
  step("Rerun initial sync writes the fixed row: no failed rows in the new run");
  await page.goto(`${base}/maps/customers/initial-sync`);
  const before = Number(await page.locator("dd[data-run]").getAttribute("data-run"));
  await page.getByRole("button", { name: "Rerun initial sync" }).click();
  const notice = await page.locator("#notice").textContent();
  check(/RerunInitialSync customers: (completed|accepted)/.test(notice), `notice: ${notice}`);
  const deadline = Date.now() + 120_000;
  for (;;) {
    await page.goto(`${base}/maps/customers/initial-sync`);
    const run = Number(await page.locator("dd[data-run]").getAttribute("data-run"));
    const phase = await page.locator("dd[data-phase]").getAttribute("data-phase");
    if (run === before + 1 && phase === "done") break;
    check(Date.now() < deadline, `run ${run}, phase ${phase}: the rerun did not finish`);
    await page.waitForTimeout(500);
  }
  check((await page.locator("dd[data-failed]").getAttribute("data-failed")) === "0", "the rerun failed rows");
  check((await page.locator("#failed tbody tr").count()) === 0, "failed rows listed after the fix");
}

async function pause(page) {
  step("Pause customers from the maps page");
  await page.goto(base);
  await page.locator("tr[data-map=customers]").getByRole("button", { name: "Pause" }).click();
  const notice = await page.locator("#notice").textContent();
  check(/Pause customers: completed/.test(notice), `notice: ${notice}`);
  await page.locator("tr[data-map=customers] td[data-state='Paused']").waitFor();
}

async function resume(page) {
  step("the paused map shows its backlog; Resume catches up");
  await page.goto(base);
  await page.locator("tr[data-map=customers] [data-backlog]").waitFor({ timeout: 60_000 });
  await page.locator("tr[data-map=customers]").getByRole("link", { name: "Resume…" }).click();
  await page.getByLabel("Resume policy").selectOption("catch_up");
  await page.screenshot({ path: `${shots}/resume-dialog.png`, fullPage: true });
  await page.getByRole("button", { name: "Run", exact: true }).click();
  const notice = await page.locator("#notice").textContent();
  check(/Run customers: (completed|accepted)/.test(notice), `notice: ${notice}`);
  await page.waitForFunction(
    () => {
      const row = document.querySelector("tr[data-map=customers]");
      return row && row.querySelector("td[data-state]").dataset.state === "Running" && !row.querySelector("[data-backlog]");
    },
    null,
    { timeout: 120_000, polling: 250 },
  );
  await page.screenshot({ path: `${shots}/maps-resumed.png`, fullPage: true });
  step("the errors page lists the error records");
  await page.goto(`${base}/errors`);
  await page.screenshot({ path: `${shots}/errors.png`, fullPage: true });
}

const PHASES = {
  run: async (page) => {
    await readOnly(page);
    await signIn(page, true);
    await refusedOrder(page);
    await runFromDialog(page);
    await live(page);
    await page.setViewportSize({ width: 1280, height: 900 });
    await details(page);
    await mapping(page);
  },
  rerun: async (page) => {
    await signIn(page, false);
    await rerun(page);
    await pause(page);
  },
  resume: async (page) => {
    await signIn(page, false);
    await resume(page);
  },
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(30_000);
  check(PHASES[phase], `unknown phase ${phase}`);
  await PHASES[phase](page);
  step(`${phase}: done`);
} catch (e) {
  console.error(`console-test: FAILED at "${current}": ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
