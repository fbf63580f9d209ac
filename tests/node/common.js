'use strict'
// Shared helpers of the interop harness scripts: one JSON object per line on stdout,
// commands as JSON lines on stdin, and a working directory that makes upstream's
// getVersion() (which reads '../../package.json' relative to the cwd) find
// @cryb/mesa's own package.json.

const fs = require('fs')
const path = require('path')
const readline = require('readline')

// stdout is the event channel: keep everything else off it. Upstream logs with
// console.log in places (e.g. the portal warning); send that to stderr.
console.log = (...args) => console.error(...args)
console.info = console.log

function emit (event) {
  process.stdout.write(JSON.stringify(event) + '\n')
}

// `undefined` would vanish from the JSON line; report it as null.
function orNull (value) {
  return typeof value === 'undefined' ? null : value
}

function errorMessage (error) {
  if (error instanceof Error) return error.message
  if (error && typeof error.message === 'string') return error.message
  if (error && typeof error.type === 'string') return error.type
  return String(error)
}

// Upstream's getVersion() does readFileSync('../../package.json') relative to the
// process's cwd. From <pkg>/lib/server, '../../package.json' is <pkg>/package.json
// (version 1.5.8). Set MESA_KEEP_CWD=1 to keep the caller's cwd (and see the bug).
function chdirForGetVersion () {
  if (process.env.MESA_KEEP_CWD === '1') return
  const pkgJson = require.resolve('@cryb/mesa/package.json', { paths: [__dirname] })
  process.chdir(path.join(path.dirname(pkgJson), 'lib', 'server'))
}

// Read JSON commands, one per line, from stdin. `onEnd` runs when stdin closes.
function readCommands (onCommand, onEnd) {
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
  rl.on('line', line => {
    if (line.trim() === '') return
    let command
    try {
      command = JSON.parse(line)
    } catch (error) {
      return emit({ event: 'error', message: `invalid command line: ${errorMessage(error)}` })
    }
    if (!command || typeof command !== 'object' || typeof command.cmd !== 'string')
      return emit({ event: 'error', message: 'a command is an object with a string "cmd"' })
    try {
      onCommand(command)
    } catch (error) {
      emit({ event: 'error', cmd: command.cmd, message: errorMessage(error) })
    }
  })
  rl.on('close', () => onEnd && onEnd())
  return rl
}

// Whether stdin is a pipe or socket (a parent process talking to us) rather than a
// terminal or /dev/null.
function stdinIsPipe () {
  try {
    const stat = fs.fstatSync(0)
    return stat.isFIFO() || stat.isSocket()
  } catch (_) {
    return false
  }
}

// An uncaught exception kills the process, as it would kill the upstream application;
// say why on stdout first so the test sees it.
function reportCrashes () {
  process.on('uncaughtException', error => {
    emit({ event: 'crash', message: errorMessage(error), stack: orNull(error && error.stack) })
    process.exit(1)
  })
}

// ws 7 validates a close code only after it has marked the socket CLOSING, so an
// invalid code throws and leaves the socket stuck half-closed; check it first.
function checkCloseCode (code) {
  if (code === undefined || code === null) return
  const valid = Number.isInteger(code) &&
    ((code >= 1000 && code <= 1014 && code !== 1004 && code !== 1005 && code !== 1006) ||
     (code >= 3000 && code <= 4999))
  if (!valid) throw new Error(`invalid close code ${JSON.stringify(code)} (ws 7 accepts 1000-1014 but 1004-1006, and 3000-4999)`)
}

module.exports = { emit, checkCloseCode, orNull, errorMessage, chdirForGetVersion, readCommands, stdinIsPipe, reportCrashes }
