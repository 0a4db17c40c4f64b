-- wrk script: POST /instant_payment/get_wallet_balance over a key mix.
--   KEYS=1000 MIX=uniform|zipf|sequential|single KEY=<caller key> wrk -s bench/wrk/balance.lua URL
-- TOKENS=<file>: a Bearer value per line, each request taking the next one (instead of KEY).
-- Prints p50/p90/p99/p99.9 latency and error counts (non-2xx included) as one RESULT line.
local keys = tonumber(os.getenv("KEYS") or "1000")
local mix = os.getenv("MIX") or "uniform"
local caller_key = os.getenv("KEY") or "bench-caller-key"
local prefix = os.getenv("PREFIX") or "BENCH"
local tokens_file = os.getenv("TOKENS")
local tokens = nil
local next_token = 0

local zipf_cdf = nil
local function build_zipf(n, s)
  local cdf, total = {}, 0
  for i = 1, n do total = total + 1 / (i ^ s); cdf[i] = total end
  for i = 1, n do cdf[i] = cdf[i] / total end
  return cdf
end

local function zipf_pick()
  local u, lo, hi = math.random(), 1, keys
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if zipf_cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo - 1
end

local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + thread_id * 7919)
  if mix == "zipf" then zipf_cdf = build_zipf(keys, 1.0) end
  wrk.method = "POST"
  wrk.headers["Authorization"] = "Bearer " .. caller_key
  wrk.headers["Content-Type"] = "application/json"
  counter = thread_id
  if tokens_file then
    tokens = {}
    for line in io.lines(tokens_file) do tokens[#tokens + 1] = line end
  end
end

function request()
  local k
  if mix == "zipf" then k = zipf_pick()
  elseif mix == "sequential" then k = counter % keys; counter = counter + 1
  elseif mix == "single" then k = 0
  else k = math.random(0, keys - 1) end
  local body = '{"customer_sync_code":"' .. prefix .. k .. '"}'
  if tokens then
    local token = tokens[next_token % #tokens + 1]
    next_token = next_token + 1
    return wrk.format(nil, nil, {["Authorization"] = "Bearer " .. token,
      ["Content-Type"] = "application/json"}, body)
  end
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout + summary.errors.status
  io.write(string.format(
    "RESULT requests=%d duration_us=%d rps=%.0f p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d errors=%d non2xx=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, errors, summary.errors.status))
end
