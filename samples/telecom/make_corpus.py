#!/usr/bin/env python3
"""Generate the bundled Northwind Mobile customer-support sample corpus.

Northwind Mobile is a fictional UK mobile and broadband operator. This script writes everything under ``raw/`` (FAQ
pages, support chats, knowledge-base articles), ``eval/heldout.jsonl`` and ``planted.json``, the ground truth the
tests check the pipeline against: which PII strings were planted, which records are duplicates or near-duplicates,
which are not English or are junk, which FAQ pairs leak into the evaluation set, and which chats ask the same question
with differently rated answers (the preference pairs).

It uses the standard library only, and every random choice comes from one ``random.Random(SEED)``, so running it again
rewrites byte-identical files. The content lives in small plain-text blocks (parsed below) so it reads like prose;
the checks at the end fail loudly if an edit breaks a promise that planted.json makes.

    python samples/telecom/make_corpus.py
"""

from __future__ import annotations

import html
import json
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import ClassVar

SEED = 20260301
HERE = Path(__file__).resolve().parent
COPYRIGHT = "© 2026 Northwind Mobile. All rights reserved."


# --------------------------------------------------------------------------------------------------------------------
# Small text helpers
# --------------------------------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased word tokens, used for word counts and for the shingle similarity checks. The pattern is
    rlhf-pipeline's own (curation.records.words), so the checks below measure what its dedup steps will see."""
    return re.findall(r"\w+(?:['’]\w+)*", text.lower())


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams: the same unit MinHash near-duplicate detection works on (Broder 1997)."""
    toks = words(text)
    return {tuple(toks[i : i + n]) for i in range(max(1, len(toks) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to numbers, mod 97 must be 1."""
    compact = iban.replace(" ", "")
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


# --------------------------------------------------------------------------------------------------------------------
# FAQ pages
#
# Source format: "[form: heading]" opens a section (form is h2, h3, dl, details, or qa for the Markdown **Q:** block);
# "? " starts a question; the lines after it are the answer, wrapped freely. A blank line starts a new paragraph and
# "- " lines make a bullet list.
# --------------------------------------------------------------------------------------------------------------------

BILLING_FAQ = """
[h3: Understanding your bill]
? When will I get my first bill?
Your first bill usually arrives about a week after your plan starts, and it's often a little higher than the ones
that follow. That's because it covers two things: the days between your start date and your first bill date, charged
pro rata, and your next month's plan charge in advance. After that you'll be billed on the same date each month. You
can find your bill date in the My Northwind app under Account > Billing.

? Why is my bill higher than usual?
Most unexpected increases come from usage outside your allowance or from one-off charges. It's worth checking for:

- Calls to premium-rate or directory numbers (numbers starting 09 or 118 are never included in your allowance)
- Roaming outside Roam Zone 1 without a Travel Pass
- Add-ons or extra data you bought during the month
- Third-party purchases charged to your bill, such as app store or game subscriptions

Your itemised bill in the My Northwind app lists every chargeable item with its date, time and cost, so you can see
exactly where the extra came from.

? How do I read my itemised bill?
Open the My Northwind app, tap Billing and choose the month you want. The summary at the top shows your plan charge,
any add-ons and the total. Below that, Usage outside your plan lists each chargeable call, text or data session. Calls
are shown with the number dialled, the duration and the cost, and data is grouped by day. If you'd rather have a PDF,
tap Download bill; PDFs are kept for the last 18 months.

? Can I change my bill date?
Yes, once every six months. Go to Account > Billing > Bill date in the My Northwind app and pick any date between
the 1st and the 28th. The month you change it, you'll get one bill that includes a pro rata adjustment for the extra
or missing days, so it may be higher or lower than normal. Your Direct Debit moves to the new date automatically, and
you don't need to contact your bank.

[h2]
? How can I pay my bill?
Most customers pay by Direct Debit, which is taken automatically on your bill date. You can also:

- Pay by debit or credit card in the My Northwind app or on our website
- Set up a recurring card payment if you'd rather not use Direct Debit
- Pay in cash at any Northwind store or PayPoint outlet using the barcode on your bill

We never ask for card details by text message or email. If someone does, it isn't us.

? What happens if I miss a payment?
We'll text and email you to let you know, then try to take the payment again five days later. If it still doesn't go
through, a £5 late payment fee is added to your next bill. After 28 days without payment we may restrict outgoing
calls and data, though you'll always be able to call 999 and 150. If money is tight, please talk to us early: our
Extra Help team can spread what you owe over a few months or move you to a cheaper plan without a fee.

? Why has my monthly price gone up?
Each April your airtime price goes up by a fixed amount in pounds and pence, which is shown in your contract summary
and in the order confirmation you received when you joined. For mobile plans it's £1.50 a month, and for broadband
it's £3 a month. Flex Pay device payments never change. We'll text you at least 30 days before the new price starts.
If you joined in January, February or March, your first rise happens the April after next.

? Can I set a spending limit?
Yes. Spend Cap lets you choose a monthly limit from £0 to £100 for anything outside your plan, including roaming,
premium numbers and third-party purchases. Once you reach it, chargeable services are blocked until your next bill
date, while your plan's allowances keep working as normal. Set or change it in the app under Account > Spend Cap.
Changes take effect within an hour. You can lower the cap at any time, but you can only raise it once a month.

[dl: Quick answers]
? Can I get a paper bill?
Yes. Paper bills cost £1.50 a month and are posted to your billing address a few days after your bill date. They're
free if you're over 75, if you're registered blind or partially sighted, or if you don't have internet access at
home. We also offer large print, Braille and audio bills at no charge. To switch, call 150 from your Northwind phone
or ask in any store.

? How do I get a VAT invoice?
Every bill in the My Northwind app is a valid VAT invoice, showing our VAT number and the VAT charged on each item.
Download the PDF from Billing and choose the month you need. If you're a business customer and need a single invoice
covering several lines, the Northwind Business team can set that up for you, usually within two working days.

? Do you charge for paying by card?
No. We don't charge a fee for paying by debit or credit card, whether you pay in the app, on the website or over the
phone. Some credit card providers treat payments to phone companies as a cash advance, so it's worth checking with
your card issuer. Payments usually show on your account within a few minutes, but they can take up to 24 hours to
appear on your bill.

? Are calls to 0800 numbers free?
Yes. Calls to numbers starting 0800 and 0808 are free from Northwind mobiles and don't count against your minutes or
your Spend Cap. Calls to numbers starting 01, 02 and 03 are included in your plan minutes as well. Numbers starting
084, 087, 09 and 118 cost a service charge set by the organisation you're calling plus our access charge of 55p a
minute, and both are listed on your bill.

[details]
? How do I dispute a charge on my bill?
Start a chat in the My Northwind app and tell us which charge you don't recognise; it helps to have the date and
amount handy. We'll look into it and reply within five working days. If we agree the charge was wrong, the refund
appears on your next bill. If you're not happy with our answer, or we haven't resolved it within eight weeks, you can
ask the Communications Ombudsman to review it. Their service is independent and free.
"""

ROAMING_FAQ = """
[h3: Where your plan works]
? Where can I use my plan abroad?
We group destinations into three Roam Zones. Roam Zone 1 covers the EU plus Norway, Iceland, Switzerland and Turkey,
and Gale plans include it at no extra cost. Roam Zone 2 covers over 60 destinations including the USA, Canada,
Australia and Japan, and Roam Zone 3 is the rest of the world. Outside what your plan includes, you can buy a Travel
Pass for the days you need it. Check any country in the app under Roaming > Where I'm going.

? What does Roam Zone 1 include?
In Roam Zone 1 you can use your UK minutes, texts and data just as you would at home, with no daily charge on Gale
plans. Breeze plans pay £2 a day for the same thing, charged only on days you use your phone. Calls and texts back to
the UK come out of your allowance, while calls to local numbers in the country you're visiting cost 25p a minute.
Receiving calls is free.

? How much does a Travel Pass cost?
A Travel Pass lets you use your UK allowance abroad for 24 hours from the first time you use your phone in that zone.

- Roam Zone 1: £2 a day on Breeze plans (already included on Gale plans)
- Roam Zone 2: £5 a day (included on Gale Unlimited Max)
- Roam Zone 3: £8 a day

You're only charged on days you actually make a call, send a text or use data. Add a Travel Pass in the app before
you go, and we'll cap your Travel Pass charges at £50 per bill period.

? Do I need to turn on data roaming?
Yes. For your phone to use mobile data outside the UK, data roaming has to be switched on in your phone's settings.
On an iPhone it's in Settings, then Mobile Data, then Mobile Data Options. On most Android phones it's in Settings,
then Connections or Network, then Mobile networks. Turning it on doesn't cost anything by itself; you're only charged
according to your plan or Travel Pass when you actually use data abroad.

[h2]
? Why isn't my mobile data working abroad?
If you can make calls but data won't connect, try these steps in order:

- Check data roaming is switched on in your phone's settings
- Turn Airplane mode on for 30 seconds, then off again
- Select a network manually: turn off automatic network selection and pick another local partner network
- Check the APN is set to northwind.net

If none of that works, open the My Northwind app on Wi-Fi and start a chat. We can refresh your roaming profile
remotely, which fixes most remaining problems in a few minutes.

? Is there a fair use limit when roaming in Europe?
Yes. In Roam Zone 1 you can use up to 25GB of data a month, or your plan's data allowance if that's smaller. If you
go over, it costs £3.50 per GB until you're back in the UK. We'll text you when you reach 80% and 100% of the limit so
nothing comes as a surprise. The limit is designed for holidays and short trips; if you spend more than two months in
any four abroad, we may ask you to change how you use your plan.

? Will I be charged for calls I receive abroad?
Receiving calls in Roam Zone 1 is free. In Roam Zones 2 and 3 incoming calls are included if you've bought a Travel
Pass that day; without one they cost £1.50 a minute. Voicemail is the one to watch: if a call diverts to voicemail
while you're abroad, it can be charged as two calls. Switching off call divert before you travel, or using Wi-Fi
Calling where you can, avoids the problem.

? Can I use my phone on a cruise ship or a plane?
You can, but it's expensive. Ships and planes use satellite networks that aren't part of any Roam Zone or Travel
Pass, so calls cost £5 a minute, texts 60p and data £10 per MB. Your phone may connect to them automatically, even
when the ship is in port. To be safe, keep Airplane mode on while at sea or in the air and use the onboard Wi-Fi if
you need to get online. Spend Cap also applies to these charges.

[dl: Calls and texts abroad]
? How do I call a UK number from abroad?
Dial the number in international format: replace the first 0 with +44. So a UK mobile number starting 07 becomes
+44 7, followed by the rest of the number. Calls back to the UK are part of your allowance in Roam Zone 1, and in
other zones when you have a Travel Pass. Calling 150 to reach Northwind customer services is always free, wherever
you are.

? Does Wi-Fi Calling work abroad?
Yes, on most phones. When you're connected to Wi-Fi abroad, calls and texts to UK numbers made over Wi-Fi Calling are
charged as if you were in the UK, so they come out of your plan allowance and you don't need a Travel Pass. A few
countries block Wi-Fi Calling, including the United Arab Emirates and China. Check Wi-Fi Calling is switched on
before you leave, as you can't always turn it on for the first time abroad.

? Can I block roaming altogether?
Yes. If you'd rather never be charged abroad, for example on a child's phone, you can add a roaming bar for free in
the My Northwind app under Account > Roaming. With the bar on, your phone won't connect to networks outside the UK at
all, so you can still use Wi-Fi but not mobile calls, texts or data. You can remove the bar yourself at any time, and
it takes effect within 15 minutes.

? Does roaming work on pay as you go?
Yes. Northwind PAYG customers can use their bundle allowance in Roam Zone 1 at no extra cost, up to the same 25GB fair
use limit. In Roam Zones 2 and 3 you'll need a Travel Pass, which is taken from your credit, so make sure you've
topped up before you travel. Without a Travel Pass, calls, texts and data abroad are charged from your credit at our
standard roaming rates, which you'll find in the app.

[details]
? Which network will my phone use abroad?
We have partner networks in over 190 countries, and your phone will normally pick the strongest one automatically.
You'll see its name at the top of your screen, sometimes with a small R icon to show you're roaming. If the signal is
weak or data stops working, you can choose another partner manually in your network settings. Every partner network
gives you the same prices, so there's no cheaper option to hunt for.
"""

BROADBAND_FAQ = """
[h2]
? Which broadband speeds do you offer?
Our full fibre plans come in three speeds:

- Northwind Fibre 150: average download 150Mbps, good for a couple of people streaming and working from home
- Northwind Fibre 500: average 500Mbps, for busy households with lots of devices
- Northwind Fibre 900: average 900Mbps, for large homes, keen gamers and anyone uploading big files

Where full fibre isn't available yet, Northwind Home 5G offers average speeds of around 120Mbps with no engineer
visit. Enter your postcode on our website to see what you can get.

? How long does installation take?
Most full fibre orders go live within 10 to 14 days. If your home already has a full fibre connection, we can often
switch you over remotely in as little as three working days, and your Hub arrives the day before. If an engineer
needs to install a new line, the visit usually takes two to four hours. You'll get a text with your installation date
and a reminder the day before, and you can reschedule in the app.

? Does an engineer need to visit?
Only if your home doesn't already have a full fibre line. The engineer will run a cable from the nearest pole or
underground chamber to your home and fit a small box called an ONT, usually on the inside wall where the cable comes
in. Someone over 18 needs to be home for the visit. They'll also plug in your Hub and check the connection before
they leave. Home 5G never needs an engineer: you just plug the box in.

? My broadband is slow. What can I check?
Before getting in touch, it's worth trying a few quick checks:

- Restart your Hub by switching it off at the wall for 30 seconds
- Run a speed test on a device plugged in with an Ethernet cable, since Wi-Fi speeds are always lower
- Move the Hub off the floor and away from TVs, microwaves and fish tanks
- Check whether someone else in the house is downloading large files

If your wired speed is still below the minimum guaranteed speed in your contract summary, tell us and we'll
investigate.

[h3: Your Northwind Hub]
? What is the Northwind Hub?
The Northwind Hub 4 is the Wi-Fi router that comes with every fibre plan. It supports Wi-Fi 6E, has four Gigabit
Ethernet ports and a 2.5 Gigabit port for the fastest plans, and picks the clearest Wi-Fi channel automatically every
night. It stays our property while you're a customer, so if you leave we'll send you a prepaid bag to return it. If
it develops a fault, we'll replace it for free.

? How do I log in to my Hub's settings?
Connect to your Hub's Wi-Fi or plug in a cable, then type hub.home into your web browser's address bar. The admin
password is printed on the sticker on the back of the Hub, under the Wi-Fi password. From there you can change your
Wi-Fi name and password, set up port forwarding or turn on the guest network. If you've changed the admin password
and forgotten it, hold the reset button for 15 seconds to restore the factory settings.

? Can I use my own router?
Yes. Plug your router's WAN port into the ONT box using an Ethernet cable and set the connection type to DHCP; you
don't need a username or password. Keep your Northwind Hub somewhere safe, though, because if you report a fault we
may ask you to test the line with it. Our support team can help with the connection itself, but we can't configure
other manufacturers' routers for you.

[dl: More questions]
? What are Wi-Fi Boost discs?
Wi-Fi Boost discs are small mesh extenders that work with your Hub to spread strong Wi-Fi around bigger or
awkward-shaped homes. They set themselves up in a few minutes and move your devices to the best signal as you walk
around. Most homes need one or two. Fibre 900 includes one disc for free, and you can add more on any plan for £5 a
month each, with no extra contract.

? What happens if my broadband stops working?
First, check the service status page in the My Northwind app, which shows known faults in your area. If there's
nothing listed, restart your Hub and check the cables. If it's still down, report it in the app and we'll run a line
test straight away. If your service isn't fixed by the end of the second full working day, you'll automatically get
£9.76 credit for each day it stays down, with no need to claim.

? Can I take my broadband with me when I move?
Yes. Tell us your new address at least two weeks before you move, using Moving home in the My Northwind app. If full
fibre is available at the new address, we'll book the connection for your moving day and you keep your current plan
and contract end date. If it isn't, you can switch to Home 5G without any fee, or leave without an early termination
charge if neither service is available there.

? Is there a minimum contract term?
Our fibre plans come with an 18-month or 24-month minimum term, and the 24-month option is a few pounds a month
cheaper. Home 5G is also available on a rolling 30-day plan, which is handy if you're renting or only staying
somewhere for a few months. If you leave during the minimum term, early termination charges apply; your contract
summary shows the exact amount for each month.

? Do you offer a home phone line?
Yes, as Northwind Home Phone. It's a digital landline that works through your Hub: plug your existing handset into
the phone port on the back. You can keep your current landline number, and calls to UK landlines and mobiles are
included for £7 a month. If you rely on a telecare alarm, please tell us before you switch so we can check it's
compatible and send you a free battery backup.

[details]
? What is Northwind Home 5G?
Home 5G is broadband that uses our 5G mobile network instead of a cable. You plug the router into a socket near a
window and it's ready in minutes, with no engineer and no line to install. Average speeds are around 120Mbps, but
they depend on the 5G signal where you live, so we'll check your address first. If you're not happy with the speeds
in the first 30 days, you can return it and cancel for free.
"""

DEVICES_FAQ = """
[h3: Paying for your phone]
? How does Flex Pay work?
Flex Pay splits the cost of your phone into monthly payments over 24 or 36 months, separate from your airtime plan.
You can choose how much to pay upfront, from nothing to half the price, and the monthly payment changes to match.
Flex Pay is interest-free, so you never pay more than the phone's cash price. Because the device and airtime are
separate, you can change your plan without affecting your phone payments.

? Can I pay off my phone early?
Yes, at any time and with no fee. Go to Devices in the My Northwind app and tap Pay off balance, or ask us in chat.
Once it's paid off, the phone is yours outright and nothing changes about your airtime plan. If you only want to
reduce what you owe, you can make a part payment of any amount over £20, and the remaining monthly payments will go
down to match.

[h3: Upgrades and trade-in]
? How do I upgrade my phone?
Open the My Northwind app and tap Upgrade. You'll see the phones and plans you can choose from, along with any
balance left on your current Flex Pay agreement. Once you order, your new phone is usually delivered the next working
day. Your number, contacts and plan history all stay the same. Don't forget to back up your old phone first and, if
you're trading it in, to sign out of iCloud or your Google account.

? Am I eligible for an early upgrade?
You can upgrade whenever you like, as long as your account is up to date. If you still owe something on your current
Flex Pay agreement, you'll need to pay off the balance or trade your old phone in to cover it. The upgrade screen in
the app shows you the exact amount. There are no separate upgrade fees, and your airtime plan can stay the same or
change with the new phone.

? How does trade-in work?
Get a quote in the app by answering a few questions about your phone's condition. When your new phone arrives, we'll
send a free prepaid pack for the old one, and you have 14 days to send it back. Once it passes our checks, the money
goes onto your account as credit or straight to your bank within five working days. If the phone is in worse
condition than you described, we'll offer you a revised price or return it for free.

[h2]
? My new phone arrived damaged. What should I do?
We're sorry about that. Please don't try to use it or set it up. Take a couple of photos of the damage and the box,
then start a chat in the app or call 150 within 14 days of delivery. We'll send a courier to collect it and ship a
replacement as soon as it's collected, usually within two working days. You won't be charged for the damaged phone
or the courier.

? How do I unlock my phone?
Every phone we've sold since December 2021 is already unlocked, so you can use another network's SIM in it straight
away. If you bought your phone from us before then, request a free unlock code in the My Northwind app under
Devices > Unlock. We'll send you the code and instructions by text within two working days. Some older phones need to
be connected to Wi-Fi with a different SIM inside to finish unlocking.

? Which phones support eSIM?
Most recent flagship phones support eSIM, including the iPhone XS and later, Samsung Galaxy S20 and later, Google
Pixel 3 and later, and most foldables. Phones sold in some countries may have eSIM disabled, so it's worth checking
your model number. The quickest way to check is in your phone's settings: if you see an option to add an eSIM or a
mobile plan, your phone supports it.

? Can I use an eSIM and a physical SIM at the same time?
Yes, if your phone supports dual SIM. Many people keep a physical SIM for one number and an eSIM for another, for
example a work line and a personal line. You can choose which number to use for calls, texts and mobile data in your
phone's settings. Both lines are billed separately, and each has its own plan and allowance.

[dl: Lost, stolen or broken]
? What does DeviceCare cover?
DeviceCare is our optional phone insurance. It covers accidental damage, including cracked screens and liquid
damage, as well as loss, theft and breakdowns outside the manufacturer's warranty. Prices start at £7 a month
depending on your phone, and there's an excess for each claim, from £25 for a screen repair. Repairs usually take
place at one of our stores on the same day. You can cancel DeviceCare at any time without a fee.

? My phone has been lost or stolen. What should I do?
Tell us as soon as you can, through the app on another device or by calling 150 from any Northwind phone. We'll bar
your SIM straight away so nobody can run up charges, and we can block the handset too so it won't work on any UK
network. If you have DeviceCare, we'll start your claim in the same call. Report a theft to the police as well, and
keep the crime reference number.

? What happens to my eSIM if I lose my phone?
Your eSIM is tied to the lost phone, so we'll need to bar it and issue a new one. Tell us straight away and we'll
block it so nobody can use your number. When you have a replacement phone, request a new eSIM in the app or in a
store and we'll send a fresh QR code. Your number, plan and balance stay exactly the same.

[details]
? Can I return a phone if I change my mind?
Yes. If you bought online or over the phone, you have 14 days from delivery to change your mind and send the phone
back for a full refund. It needs to be in its original condition with all accessories, and you'll need to remove any
passwords or accounts first. Start a return in the app under Orders and we'll email you a free returns label. If
you've made calls or used more than a little data, we may charge for that usage.
"""

ESIM_FAQ = """
[h2]
? What is an eSIM?
An eSIM is a digital SIM built into your phone. Instead of putting in a plastic SIM card, you download your Northwind
profile by scanning a QR code or through the My Northwind app. It works exactly like a physical SIM: same number,
same plan, same network. Because there's nothing to post, you can usually be up and running within a few minutes of
ordering.

? Which phones support eSIM?
Most recent flagship phones support eSIM, including the iPhone XS and newer, Samsung Galaxy S20 and newer, Google
Pixel 3 and later, and most foldables. Phones sold in some countries may have eSIM disabled, so it's worth checking
your model number. The quickest way to check is in your phone's settings: if you see an option to add an eSIM or a
mobile plan, your phone supports it.

? How do I get an eSIM from Northwind?
If you're joining us, just choose eSIM when you order and we'll email a QR code as soon as your order is approved. If
you're already with us, open the My Northwind app, go to SIM > Switch to eSIM and follow the steps. On iPhone and
recent Android phones the app can install the eSIM directly, so you don't even need the QR code. Switching is free.

? How do I move my eSIM to a new phone?
On iPhone, you can usually transfer your eSIM while setting up the new phone: when asked, choose Transfer from nearby
iPhone and keep both phones close together. On Android, or if the transfer doesn't work, request a new eSIM in the My
Northwind app under SIM > Replace eSIM. We'll send a new QR code to the email address on your account, and your old
eSIM stops working as soon as the new one is active.

? My eSIM QR code won't scan. What can I do?
First, make sure you're connected to Wi-Fi, because the phone needs internet access to download the eSIM. Show the
QR code on another screen or print it, rather than trying to scan it on the same phone. If it still won't scan,
choose Enter details manually and type in the SM-DP+ address and activation code shown under the QR code in your
email. Each code only works once, so if it has been used already, ask us for a new one.

? Can I use an eSIM and a physical SIM at the same time?
Yes, if your phone supports dual SIM. Many customers keep a physical SIM for one number and an eSIM for another, for
example a work line and a personal line. You can choose which number to use for calls, texts and mobile data in your
phone's settings. Both lines are billed separately, and each has its own plan and allowance.

? What happens to my eSIM if I lose my phone?
Your eSIM is tied to the lost phone, so we'll need to bar it and issue a new one. Tell us right away and we'll
block it so nobody can use your number. When you have a replacement phone, request a new eSIM in the app or at a
store and we'll send a fresh QR code. Your number, plan and balance stay exactly the same.

? Can I use my eSIM abroad?
Yes. Your eSIM works abroad exactly like a physical SIM, with the same Roam Zones, Travel Passes and prices. You can
also add a local eSIM from a network in the country you're visiting alongside your Northwind eSIM, and choose which
one to use for data. That's handy on long trips to Roam Zone 3. Remember to keep your Northwind line switched on if
you want to receive calls and texts.

? Can I get an eSIM for my smartwatch?
Yes, with Northwind Duo. Duo gives your Apple Watch or compatible Samsung Galaxy Watch the same number as your phone,
so you can take calls and get messages when your phone is at home. It costs £5 a month on top of your plan and
shares your phone's data allowance. Set it up from the Watch app on iPhone or the Galaxy Wearable app on Android,
choosing Northwind when prompted.

? Is an eSIM more secure than a physical SIM?
In one important way, yes. A thief can't pop an eSIM out of your phone and put it into another device, so it's
harder for someone to use your number if your phone is stolen. Moving an eSIM to a new phone also needs a code sent
to you, which helps protect against SIM swap fraud. You should still use a screen lock and a SIM PIN for the best
protection.

? Does switching to eSIM change my number or plan?
No. Your number, plan, allowances, contract end date and bill stay exactly the same. The only thing that changes is
how the SIM is stored on your phone. Your old physical SIM stops working once the eSIM is activated, so keep it
until your eSIM is working and then cut it up. If you change your mind, you can switch back to a physical SIM for
free.

? Why does my phone say No Service after switching to eSIM?
This usually means the eSIM is installed but not yet switched on. Go to your phone's mobile settings, select the
Northwind line and make sure Turn on this line is enabled. If you have two lines, check the Northwind one is chosen
for mobile data. Then restart your phone. If you still see No Service after 30 minutes, contact us so we can check
the eSIM was activated on our side.

[qa: Quick answers]
? Can I reuse my eSIM QR code?
No. Each QR code can only be used once, so deleting the eSIM from your phone means you'll need a new code. If you
reset your phone or remove the eSIM by mistake, request a replacement in the My Northwind app or ask us in chat. New
codes are free and usually arrive by email within a few minutes, though it can take up to an hour at busy times.
"""

CONTRACTS_FAQ = """
[h2]
? How long is my contract?
It depends on what you chose. SIM-only plans are available on a 30-day rolling contract or a 12-month or 24-month
term, and longer terms have lower monthly prices. Flex Pay device agreements last 24 or 36 months and run separately
from your airtime plan. Fibre broadband has an 18-month or 24-month term. Your contract summary, which we emailed
when you joined, shows your exact start and end dates.

? Can I cancel within 14 days?
Yes. If you joined online or over the phone, you have 14 days from the day your plan starts (or from delivery, if you
bought a phone) to cancel without giving a reason. Just tell us in chat or call 150. You'll only pay for anything
you've used outside your plan, plus a share of the monthly charge for the days you had the service. If you bought a
phone, return it in its original condition for a full refund.

? How do I leave Northwind and keep my number?
Text PAC to 65075 from your Northwind phone and we'll reply within a minute with your Porting Authorisation Code,
along with details of any early termination charges. Give the code to your new provider, and they'll arrange the
switch, usually by the next working day. Your Northwind service ends automatically once your number moves across, so
you don't need to cancel separately. A PAC is valid for 30 days.

? What are early termination charges?
If you leave before your minimum term ends, you'll pay an early termination charge. For airtime plans it's the
monthly charges left to the end of the term, minus a discount for the costs we save (usually around 4%) and any VAT
we don't have to charge. Any remaining Flex Pay balance for a phone is also due. Text COST to 85075 to get an exact
figure for today, or see it in the app under Account > My contract.

? What happens when my contract ends?
We'll let you know by text or email between 10 and 40 days before your minimum term ends, including our best deals
for you. If you do nothing, you move onto a rolling monthly contract at the same price, and you can leave at any time
with 30 days' notice. If your contract included a phone that's now paid off, moving to a SIM-only plan is usually the
cheapest option.

? Can I move to a cheaper plan during my contract?
You can move down to a cheaper plan once in each 12 months of your contract, and the change takes effect from your
next bill date. Moving down doesn't change your minimum term. Some promotional plans can't be changed until the offer
ends, and if that applies to you, you'll see it in the app. Flex Pay payments aren't affected either way, because
they're separate from your airtime plan.

? Can I move to a bigger plan at any time?
Yes. You can move up to a plan with more data, or add unlimited minutes, as often as you like, and it won't extend
your contract. The change happens straight away, and your next bill will include a pro rata charge for the rest of
the current month. You'll get a text confirming your new allowance as soon as it's live. Moving up is free, and you
can do it in the app under Plans > Change plan.

? What is a contract summary?
A contract summary is a short document we send before you agree to a new contract. It sets out the main things you
need to know: the monthly price, how and when that price will change, the minimum term, your allowances, the
broadband speeds we guarantee and what it costs to leave early. It's a good idea to keep it. You can find a copy of
every contract summary in the app under Account > Documents.

? What happens to my contract if I move abroad?
Our plans are for people who live in the UK, so if you're moving abroad permanently you'll need to end your contract.
If you're still within your minimum term, early termination charges apply, but we'll waive them if you're moving
abroad on a military or diplomatic posting. If you want to keep your UK number, you can move to pay as you go before
you leave.

? Can I transfer my contract to someone else?
Yes, with a transfer of ownership. Both you and the new account holder need to agree, and the new owner will need to
pass a credit check. Start the process in the app under Account > Transfer ownership, then the new owner completes
their part within seven days. Any outstanding Flex Pay balance moves across with the contract, and the phone number
moves with it too.

? What happens to an account when the account holder dies?
We're very sorry for your loss. Our bereavement team will close the account without any early termination charges,
or transfer the number to a family member if you'd like to keep it. Any remaining Flex Pay balance is usually written
off. You can tell us through the bereavement form on our website or by calling 150, and we'll need a copy of the
death certificate or a letter from the solicitor handling the estate.

? Do you run a credit check when I join?
Yes, for all pay monthly plans. We run a soft check first, which doesn't affect your credit score, to tell you
whether you're likely to be accepted. The full check happens only when you place your order. If you're declined, you
can still join on a 30-day SIM-only plan, which doesn't need a credit check, or on pay as you go. Your order
confirmation will tell you which agency we used.

[qa: Before you go]
? Can I pause my contract?
We can't pause a contract, but there are options if you're away for a long time or money is tight. You can move down
to our Breeze Lite plan for £5 a month, which keeps your number active with a small allowance, then move back up when
you're ready. If you're going through financial difficulty, our Extra Help team can also agree a payment break of up
to three months.
"""

# Page metadata: file name, source, title, breadcrumb, intro. The two .md pages are rendered as Markdown.
FAQ_PAGES = [
    ("billing.html", BILLING_FAQ, "Billing and payments", "Billing",
     "Questions about your bill, paying, price changes and charges you don't recognise."),
    ("roaming.html", ROAMING_FAQ, "Roaming and travel", "Roaming",
     ("Taking your Northwind phone abroad? Here's how roaming works on our plans, what it costs and what to do if "
     "something isn't working.")),
    ("broadband.html", BROADBAND_FAQ, "Home broadband", "Broadband",
     "Everything about Northwind Fibre, Home 5G, your Hub and getting the best from your connection."),
    ("devices.html", DEVICES_FAQ, "Phones and devices", "Devices",
     "Buying, upgrading, trading in and looking after your phone."),
    ("esim.md", ESIM_FAQ, "eSIM", "eSIM", "Everything you need to know about using an eSIM with Northwind Mobile."),
    ("contracts.md", CONTRACTS_FAQ, "Contracts, switching and leaving", "Contracts",
     "How our contracts work, and what to do if you want to change plan or leave."),
]
FAQ_MIRROR = ("billing.html", "billing-copy.html")  # an exact byte-for-byte copy, as a site mirror would leave
# (page, question) pairs repeated on another page with 1-3 words changed in the answer
FAQ_NEAR_DUPLICATES = [
    ("devices.html", "esim.md", "Which phones support eSIM?"),
    ("devices.html", "esim.md", "Can I use an eSIM and a physical SIM at the same time?"),
    ("devices.html", "esim.md", "What happens to my eSIM if I lose my phone?"),
]


def parse_faq(source: str) -> list[dict]:
    """Sections of {form, heading, pairs: [(question, blocks)]}; a block is ("p", text) or ("ul", [items])."""
    sections: list[dict] = []
    answer: list[str] = []
    for line in source.strip().splitlines():
        if line.startswith("["):
            form, _, heading = line.strip("[]").partition(":")
            sections.append({"form": form.strip(), "heading": heading.strip() or None, "pairs": []})
        elif line.startswith("? "):
            answer = []
            sections[-1]["pairs"].append((line[2:].strip(), answer))
        else:
            answer.append(line)
    for section in sections:
        section["pairs"] = [(q, answer_blocks(lines)) for q, lines in section["pairs"]]
    return sections


def answer_blocks(lines: list[str]) -> list[tuple]:
    blocks: list[tuple] = []
    for chunk in "\n".join(lines).strip().split("\n\n"):
        rows = chunk.splitlines()
        if rows[0].startswith("- "):
            blocks.append(("ul", [row[2:].strip() for row in rows]))
        else:
            blocks.append(("p", " ".join(row.strip() for row in rows)))
    return blocks


def blocks_text(blocks: list[tuple]) -> str:
    """The answer as plain text, the way an extractor should see it (paragraphs and list items on their own lines)."""
    return "\n".join(b[1] if b[0] == "p" else "\n".join(b[1]) for b in blocks)


def esc(text: str) -> str:
    return html.escape(text, quote=False)


def html_blocks(blocks: list[tuple], indent: str = "") -> str:
    out = []
    for kind, body in blocks:
        if kind == "p":
            out.append(f"{indent}<p>{esc(body)}</p>")
        else:
            items = "\n".join(f"{indent}  <li>{esc(item)}</li>" for item in body)
            out.append(f"{indent}<ul>\n{items}\n{indent}</ul>")
    return "\n".join(out)


def html_section(section: dict) -> str:
    form, heading, pairs = section["form"], section["heading"], section["pairs"]
    out = ['<section class="faq-section">']
    if heading:
        out.append(f"  <h2>{esc(heading)}</h2>")
    if form == "dl":
        out.append('  <dl class="faq-list">')
        for q, blocks in pairs:
            out.append(f"    <dt>{esc(q)}</dt>")
            if len(blocks) == 1 and blocks[0][0] == "p":  # short answers sit directly in the <dd>, as CMSs emit them
                out.append(f"    <dd>{esc(blocks[0][1])}</dd>")
            else:
                out.append(f"    <dd>\n{html_blocks(blocks, '      ')}\n    </dd>")
        out.append("  </dl>")
    elif form == "details":
        for q, blocks in pairs:
            out.append(f'  <details class="faq-more">\n    <summary>{esc(q)}</summary>')
            out.append(html_blocks(blocks, "    "))
            out.append("  </details>")
    else:
        opening = '<h3 class="faq-question">' if form == "h3" else "<h2>"
        for q, blocks in pairs:
            out.append(f"  {opening}{esc(q)}</{opening[1:3]}>")
            out.append(html_blocks(blocks, "  "))
    out.append("</section>")
    return "\n".join(out)


NAV_LINKS = [("Plans", "/plans"), ("Phones", "/phones"), ("Broadband", "/broadband"), ("Roaming", "/roaming"),
             ("Help", "/help"), ("My Northwind", "/my-northwind")]
HELP_LINKS = [("Billing", "/help/billing"), ("Roaming", "/help/roaming"), ("Broadband", "/help/broadband"),
              ("Phones and devices", "/help/devices"), ("eSIM", "/help/esim"), ("Contracts", "/help/contracts")]
FOOTER_LINKS = [("About us", "/about"), ("Careers", "/careers"), ("Terms &amp; conditions", "/terms"),
                ("Privacy", "/privacy"), ("Cookies", "/cookies"), ("Accessibility", "/accessibility"),
                ("Sitemap", "/sitemap")]


def faq_html(title: str, crumb: str, intro: str, sections: list[dict]) -> str:
    main_nav = "\n".join(f'        <li><a href="{href}">{label}</a></li>' for label, href in NAV_LINKS)
    help_nav = "\n".join(f'      <li><a href="{href}">{label}</a></li>' for label, href in HELP_LINKS)
    footer_nav = " |\n".join(f'      <a href="{href}">{label}</a>' for label, href in FOOTER_LINKS)
    body = "\n".join(html_section(s) for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en-GB">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{esc(title)} FAQ | Northwind Mobile</title>
  <meta name="description" content="Answers to common questions about {esc(title.lower())} at Northwind Mobile.">
  <link rel="stylesheet" href="/assets/css/site.min.css">
  <script>
    window.dataLayer = window.dataLayer || [];
    function gtag(){{dataLayer.push(arguments);}}
    gtag('consent', 'default', {{'analytics_storage': 'denied'}});
  </script>
</head>
<body class="help-page">
  <div id="cookie-banner" class="cookie-banner" role="dialog" aria-label="Cookie consent">
    <p>We use cookies to make our website work, to understand how you use it and to show you relevant offers.
    You can accept all cookies or choose which ones we use. <a href="/cookies">Cookie settings</a></p>
    <button type="button" class="btn btn-primary">Accept all</button>
    <button type="button" class="btn btn-secondary">Reject non-essential</button>
  </div>
  <header class="site-header">
    <a class="logo" href="/"><img src="/assets/img/northwind-logo.svg" alt="Northwind Mobile"></a>
    <nav class="main-nav" aria-label="Main">
      <ul>
{main_nav}
      </ul>
    </nav>
    <a class="btn btn-login" href="/login">Log in</a>
  </header>
  <nav class="breadcrumb" aria-label="Breadcrumb">
    <a href="/">Home</a> &gt; <a href="/help">Help</a> &gt; <span>{esc(crumb)}</span>
  </nav>
  <div class="page">
  <aside class="help-topics">
    <h2>Help topics</h2>
    <ul>
{help_nav}
    </ul>
  </aside>
  <main id="content">
<h1>{esc(title)}: frequently asked questions</h1>
<p class="intro">{esc(intro)}</p>
<p class="updated">Last updated: 12 January 2026</p>
{body}
<aside class="contact-cta">
  <h2>Contact us</h2>
  <p>Can't find your answer here? Chat to us in the My Northwind app, any time from 8am to 10pm,
  or call 150 free from your Northwind phone.</p>
</aside>
  </main>
  </div>
  <footer class="site-footer">
    <nav aria-label="Footer">
{footer_nav}
    </nav>
    <p>{COPYRIGHT}</p>
    <p class="legal">Northwind Mobile Ltd is registered in England and Wales. Northwind Mobile is authorised and
    regulated by the Financial Conduct Authority for consumer credit and insurance distribution.</p>
  </footer>
  <script src="/assets/js/site.min.js" defer></script>
</body>
</html>
"""


def faq_markdown(title: str, intro: str, sections: list[dict]) -> str:
    out = [f"# {title}: frequently asked questions", "", (f"{intro} Can't find what you need? Chat to us in the My "
           "Northwind app."), "", "*Last updated: January 2026*", ""]
    for section in sections:
        if section["form"] == "qa":
            out += [f"## {section['heading']}", ""]
            for q, blocks in section["pairs"]:
                out += [f"**Q:** {q}", f"**A:** {blocks_text(blocks)}", ""]
            continue
        for q, blocks in section["pairs"]:
            out += [f"## {q}", ""]
            for kind, body in blocks:
                out += [body] if kind == "p" else [f"- {item}" for item in body]
                out.append("")
    return "\n".join(out)


def build_faq() -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """The FAQ files ({name: text}) and every pair on them as (file, question, answer text)."""
    files: dict[str, str] = {}
    pairs: list[tuple[str, str, str]] = []
    for name, source, title, crumb, intro in FAQ_PAGES:
        sections = parse_faq(source)
        if name.endswith(".md"):
            files[name] = faq_markdown(title, intro, sections)
        else:
            files[name] = faq_html(title, crumb, intro, sections)
        pairs += [(name, q, blocks_text(blocks)) for s in sections for q, blocks in s["pairs"]]
    original, mirror = FAQ_MIRROR
    files[mirror] = files[original]
    pairs += [(mirror, q, a) for page, q, a in pairs if page == original]
    return files, pairs


# --------------------------------------------------------------------------------------------------------------------
# Knowledge-base articles (raw/docs/). Written out as-is; one is encoded cp1252, one uses CRLF line endings.
# --------------------------------------------------------------------------------------------------------------------

DOC_5G = """\
# What is 5G? A plain-English guide

5G is the fifth generation of mobile network technology. Like 4G before it, it carries your calls, texts and data
between your phone and our masts, but it's designed to move much more data, much faster, with far less delay. This
guide explains what that means in practice, what you need to use it, and why the 5G icon on your screen doesn't
always mean blistering speeds.

## How is 5G different from 4G?

There are three big differences.

**Speed.** On the Northwind network, 5G typically delivers download speeds of 150 to 400Mbps, and peaks above 1Gbps
in busy city centres where we've deployed our widest channels. 4G usually manages 20 to 60Mbps. In everyday terms, a
two-hour HD film that takes around ten minutes to download on good 4G can take under a minute on strong 5G.

**Latency.** Latency is the delay between your phone asking for something and the network responding. On 4G it's
typically 40 to 60 milliseconds; on our 5G it's closer to 15 to 25. You won't notice the difference when reading the
news, but you will in online games, video calls and cloud gaming, where a lower delay makes everything feel more
responsive.

**Capacity.** 5G can handle many more devices in the same area. That matters at football grounds, festivals and train
stations, where 4G networks can slow to a crawl because thousands of people are trying to use them at once.

## How does it work?

5G uses new radio frequencies alongside the ones 4G already uses. We use three main types:

- **Low-band (700MHz)** travels a long way and gets through walls well, so it's used to extend 5G coverage to towns
  and rural areas. Speeds are only a little better than good 4G.
- **Mid-band (3.4 to 3.8GHz)** is the workhorse of 5G. It offers a good balance of speed and range, and it's where
  most of the headline speeds come from.
- **High-band (26GHz)**, sometimes called millimetre wave, is extremely fast but only travels a few hundred metres and
  is blocked by almost anything. We're trialling it in a handful of stadiums and transport hubs.

Most of our 5G today is what the industry calls non-standalone 5G, which means your phone uses a 5G radio connection
for data but still relies on the 4G core network behind it. We're gradually switching areas to standalone 5G, which
runs entirely on new equipment and brings lower latency and better battery life. Compatible phones move to it
automatically, and you don't need to do anything.

## What do I need to use 5G?

You need three things: a 5G-capable phone, a plan that includes 5G, and 5G coverage where you are.

Most phones released since 2021 support 5G. 5G is included at no extra cost on every Northwind plan except Breeze
10GB and Breeze Lite. You can check coverage for any postcode on our coverage checker, which shows where we expect 5G
to work outdoors and indoors.

If you have all three but your phone still shows 4G, check your network settings. Some phones ship with 5G switched
off, or set to a battery-saving mode that only uses 5G when it thinks it's worth it. Look for an option called
Preferred network type or Voice & Data and choose 5G Auto or 5G On.

## Why does my phone show 5G but feel slow?

The 5G icon tells you that you're connected to 5G, not how strong the signal is. At the edge of a cell, indoors
behind energy-efficient glass, or on a low-band 5G connection, speeds can be similar to 4G or even below it. A few
things to check:

- Move closer to a window or go outside briefly to see if speeds improve.
- Check whether you've used your monthly data allowance; once it runs out, speeds are reduced.
- Run a speed test at a different time of day. If it's only slow in the evenings, the local mast may be busy, and
  it's worth reporting.

## Does 5G use more battery?

Early 5G phones did drain their batteries faster, mostly because they kept a 4G and a 5G connection running at the
same time. Newer phones and standalone 5G have largely fixed this. If battery life matters more to you than speed on
a particular day, switching to 4G in your settings is a perfectly reasonable choice.

## Is 5G safe?

Yes. 5G uses radio waves, just like 4G, Wi-Fi and FM radio. These are non-ionising, which means they don't have
enough energy to damage cells or DNA. All our masts operate well within the international exposure guidelines set by
the International Commission on Non-Ionizing Radiation Protection (ICNIRP), and independent measurements near 5G
sites regularly find exposure levels at a small fraction of the limits.

## Where can I get 5G?

Our 5G network now reaches more than 80% of the UK population, including every major city and most large towns, and
we're adding new sites every week. Rural coverage is growing fastest on the low-band 700MHz layer. Check the coverage
checker for the latest map, and sign up for coverage alerts to be told when 5G arrives in your area.
"""

DOC_FAIR_USE = """\
# Northwind Mobile fair usage policy

Last updated: 1 January 2026

This policy explains how we make sure everyone gets a fair share of our network. It applies to all Northwind Mobile
plans, including Gale Unlimited, Gale Unlimited Max, Breeze plans, Northwind PAYG and Home 5G broadband. Most
customers will never be affected by it.

## 1. Why we have a fair usage policy

Our network is shared. If a small number of people use it in ways it wasn't designed for, such as running it as a
commercial service or leaving equipment downloading around the clock, everyone else in the same area can see slower
speeds. This policy lets us protect the experience of the vast majority of customers while keeping prices low.

## 2. Unlimited data plans

Our unlimited plans really are unlimited for personal use. We don't cap how much data you use at home in the UK, and
we don't slow you down after a fixed amount. However, if you use more than 650GB in a single month, we'll look at how
the data is being used. If it looks like the line is being used for something other than personal use, we'll contact
you before we take any action.

## 3. What counts as personal use

Personal use means using your plan yourself, in a phone, tablet or mobile broadband device, for things like browsing,
streaming, social media, video calls, gaming and working from home. It also includes sharing your connection with
your own devices or your household through a personal hotspot.

It does not include:

- reselling your connection, or using it to provide a service to other people or businesses;
- using your SIM in a fixed device such as a CCTV system, alarm panel or payment terminal, unless your plan is
  designed for it;
- using automated systems to generate traffic, such as SIM boxes or bulk messaging tools;
- running servers, including peer-to-peer file sharing servers that operate continuously.

## 4. Roaming

Roaming in Roam Zone 1 is subject to a fair use limit of 25GB a month, or your plan's data allowance if that's lower.
Above that limit, data costs £3.50 per GB until you return to the UK. We'll send you a text at 80% and at 100% of
the limit.

Roaming is designed for periodic travel. If, over a four-month period, you spend more time abroad than in the UK and
use more data abroad than at home, we may contact you. If the pattern continues for a further 14 days, we may apply a
surcharge to roaming usage or ask you to move to a suitable plan.

## 5. Home 5G broadband

Home 5G routers must be used at the address registered for the service. The router is locked to a small area around
that address, so it won't work if moved elsewhere. Traffic on Home 5G may be prioritised below mobile traffic at
times of exceptional congestion, for example at a mast near a large event, so that phone users can still make calls
and use essential services.

## 6. Traffic management during congestion

At busy times we may manage some types of traffic so that time-sensitive services work well for everyone. For
example, we may slightly reduce the resolution of video streams on a congested mast while keeping voice calls, video
calls and web browsing at full priority. We never block or slow down specific websites or apps because of who
provides them.

## 7. What we'll do if we have concerns

If we believe your usage breaks this policy, we'll contact you by text or email explaining what we've seen and what
you can do. In most cases we'll suggest a more suitable plan. We'll only suspend or restrict a service if the usage
continues after we've been in touch, or if it's harming the network for other customers. You can always challenge our
decision using our complaints process.

## 8. Changes to this policy

We may update this policy to reflect changes in how people use the network or in the law. If a change is likely to
affect you materially, we'll tell you at least 30 days in advance.
"""

DOC_COVERAGE = """\
# Coverage and signal: why it varies and what you can do

Mobile signal is a radio connection between your phone and the nearest of our masts, so it's affected by distance,
terrain, buildings and even the weather. This article explains what affects your signal, how to check coverage, and
the options available if your signal at home isn't good enough.

## Checking coverage

Our online coverage checker shows predicted coverage for any UK postcode, split into 5G, 4G and 2G, and into outdoor
and indoor. The indoor prediction is the one to pay attention to if you're wondering whether your phone will work in
your living room. Predictions are based on computer modelling of our masts and the landscape around them. They're
accurate for most places, but they can't account for everything about an individual building.

The checker also shows planned improvements, such as new masts and upgrades, and any current faults or maintenance in
the area.

## Why signal is weaker indoors

Radio waves lose strength every time they pass through a wall, window or floor. Some building materials are much
worse than others:

- **Energy-efficient windows** often have a thin metallic coating that reflects radio waves as well as heat. In
  new-build homes this is one of the most common reasons for poor indoor signal.
- **Foil-backed insulation** and metal cladding act almost like a shield.
- **Thick stone or concrete walls**, common in older houses and blocks of flats, absorb a lot of signal.
- **Basements** and rooms at the back of a building, facing away from the nearest mast, are usually the weakest.

If your signal drops noticeably as you walk from the front of your home to the back, building materials are very
likely the cause.

## Other things that affect signal

Distance from the mast matters, but so does what's between you and it. Hills and valleys can block signal, so you may
have excellent coverage on one side of a village and very little on the other. Trees in full leaf can reduce signal
slightly in summer, and heavy rain has a small effect on the highest frequencies.

The number of people using a mast also affects your experience. You might have full bars at a concert and still
struggle to load a web page, because the mast is sharing its capacity between thousands of phones.

Finally, your phone itself plays a part. Cases with metal parts, a damaged antenna or outdated software can all
reduce signal. If your signal is much worse than someone else's on Northwind in the same spot, your phone may be the
cause.

## 2G, 4G and 5G

Your phone automatically chooses the best available network. Our 3G network has already closed, and we'll keep a
basic 2G service running until at least 2029 to support older devices and emergency calls in remote areas. Most calls
on our network now use 4G Calling (VoLTE), which gives clearer calls and lets you use data during a call.

## What you can do if signal is poor at home

**Wi-Fi Calling.** If you have broadband, Wi-Fi Calling is the simplest fix. Your phone makes and receives calls and
texts over your Wi-Fi whenever the mobile signal is weak, with no app to install and no extra cost. Calls are charged
exactly as normal calls.

**Northwind Signal Box.** If Wi-Fi Calling isn't an option, or several people in your home have poor signal, we may be
able to offer a Signal Box. It's a small device that plugs into your broadband router and creates a strong 4G signal
in your home for Northwind phones. It's free for customers in areas where our coverage is predicted to be good
indoors but isn't in practice. Ask us in the app, and we'll run some checks first.

**Check your phone.** Make sure your software is up to date and try removing your case. Restart the phone
occasionally, as it forces it to search afresh for the best mast.

## Reporting a coverage problem

If signal has suddenly become worse in an area where it used to be fine, please report it in the My Northwind app
under Help > Report a network problem. Include where it happens, when, and what you were trying to do. Reports help
our engineers find faults quickly, and we'll update you when we've investigated.
"""

DOC_NO_SIGNAL = """\
NO SIGNAL? A STEP-BY-STEP GUIDE
===============================

If your phone shows "No Service", "SOS only" or no bars at all, work through these steps in order. Most problems are
fixed by step 3.

1. Check for a known problem
   Open the My Northwind app on Wi-Fi and go to Service status, or use the status checker on our website. If there's
   a fault or planned work in your area, it will be listed with an expected fix time. There's no need to do anything
   else; service will come back on its own.

2. Restart your phone
   Switch it off completely, wait ten seconds and switch it on again. This forces it to search for the nearest mast
   and often fixes problems after travelling or after a software update.

3. Toggle Airplane mode
   Turn Airplane mode on, wait 30 seconds, then turn it off. This is quicker than a restart and has the same effect
   on the mobile connection.

4. Check your SIM
   If you use a physical SIM, switch off the phone, take the SIM out, check it for dirt or damage, and put it back in
   firmly. If you see "No SIM" or "Invalid SIM", the SIM may be faulty. Replacement SIMs are free.
   If you use an eSIM, check that the Northwind line is switched on in your mobile settings.

5. Check your network settings
   Make sure network selection is set to automatic. If you've changed the preferred network type, set it back to
   5G/4G Auto. Check that the APN is northwind.net.

6. Try the SIM in another phone
   Put your SIM into another unlocked phone, or another Northwind SIM into your phone. If the problem follows the SIM,
   we'll replace it. If it stays with the phone, the phone may need repairing.

7. Reset network settings
   As a last resort, reset your phone's network settings. On iPhone: Settings > General > Transfer or Reset iPhone >
   Reset > Reset Network Settings. On Android: Settings > System > Reset options > Reset Wi-Fi, mobile and Bluetooth.
   This clears saved Wi-Fi passwords, so make a note of them first.

STILL NO SIGNAL?

Start a chat in the My Northwind app, or call 150 from another Northwind phone. Tell us which steps you've tried,
where you are, and when the problem started. If your account has been barred, for example because of an unpaid bill
or a lost phone report, we can check that straight away.

Remember: even without signal from Northwind, you can call 999 or 112 if another network is available.
"""

DOC_SLOW_BROADBAND = """\
Home > Help > Broadband > Slow broadband

Cookie settings

# Why is my broadband slow? A troubleshooting guide

Your broadband speed depends on two things: the speed of the connection coming into your home, and how well that
speed reaches your devices. In our experience, most slow-speed problems are about the second part, which is good
news, because they're usually quick to fix yourself.

## Step 1: Test your speed properly

Speed tests over Wi-Fi are affected by everything from walls to the age of your device, so they rarely show what your
line is really capable of. For an accurate picture:

1. Plug a laptop or computer into one of the Hub's Ethernet ports with a cable.
2. Close other apps and pause any downloads, including game updates and cloud backups.
3. Run the speed test in the My Northwind app or on our speed test page.
4. Repeat it at a couple of different times of day.

If your wired speed is close to your plan's average speed, your connection is working properly and the problem is
with Wi-Fi. If it's below the minimum guaranteed speed in your contract summary, skip to Step 5.

## Step 2: Restart and update the Hub

Switch the Hub off at the wall, wait 30 seconds and switch it back on. It takes about three minutes to restart fully.
The Hub updates its own software overnight, but if it has been switched off at night for a while, it may have missed
updates; a restart prompts it to check.

## Step 3: Improve your Wi-Fi

Wi-Fi is a radio signal, and like any radio signal, it weakens with distance and obstacles. A few changes can make a
big difference:

- **Position.** Put the Hub in a central spot, at shelf height, in the open. Not on the floor, not in a cupboard and
  not behind the TV.
- **Interference.** Keep it away from microwaves, cordless phone bases, baby monitors, fish tanks and large mirrors.
- **Bands.** The Hub broadcasts on 2.4GHz, 5GHz and 6GHz. Higher bands are faster but have a shorter range. Smart
  Wi-Fi, which is on by default, moves your devices between bands automatically. If you've turned it off, turn it
  back on.
- **Devices.** Older phones and laptops may only support older Wi-Fi standards and will always be slower. A laptop
  from 2016 is unlikely to exceed 150Mbps over Wi-Fi, however good your connection.
- **Mesh.** In larger homes, or homes with thick walls, add one or two Wi-Fi Boost discs. They create a single
  network throughout your home, so your devices always connect to the strongest point.

## Step 4: Check what's using your connection

Every device using the connection takes a share of it. A 4K stream uses about 25Mbps, a video call around 4Mbps, and
a big game download will take everything it can get. The Devices page in the My Northwind app shows what's connected
and how much each device is using right now. If something you don't recognise is connected, change your Wi-Fi
password.

## Step 5: If your wired speed is too low

If a wired speed test is still below your minimum guaranteed speed after restarting the Hub, report it to us in the
app under Help > Broadband speed. We'll run a line test from our side, which takes about two minutes, and tell you
what we find. Common causes we can fix include:

- a fault on the fibre line between your home and the street;
- a problem with the ONT box or the Hub;
- congestion at the local connection point, where our network team can add capacity.

Under our speed guarantee, if we can't bring your speed back above the minimum within 30 days, you can leave without
early termination charges. You're also entitled to automatic compensation if your service stops working completely
for more than two full working days.

## Still slow?

If none of this helps, start a chat in the app and let us know the results of your wired and Wi-Fi speed tests.
Having those numbers to hand saves a lot of time.

Was this article helpful? Yes / No

Share on Facebook | Share on X | Email this article

""" + COPYRIGHT + "\n"

DOC_WIFI_CALLING = """\
# Wi-Fi Calling explained

Wi-Fi Calling lets your phone make and receive ordinary calls and texts over a Wi-Fi connection instead of the mobile
network. It's built into most modern phones, so there's no app to download, and your number, contacts and call
history all work just as they normally do.

## When is it useful?

Wi-Fi Calling is designed for places where the mobile signal is weak but Wi-Fi is good: a basement flat, an office
with thick walls, a rural cottage or a new-build house with energy-efficient windows. Your phone switches to Wi-Fi
Calling automatically when it decides Wi-Fi will give a better call, and switches back to the mobile network when you
leave the building. Calls usually move between Wi-Fi and 4G without dropping.

## How much does it cost?

Nothing extra. Calls and texts over Wi-Fi come out of your normal allowance, exactly as if they'd been made over the
mobile network. When you're abroad, calls and texts to UK numbers made over Wi-Fi are charged as if you were in the
UK, which can save a lot of money in countries outside Roam Zone 1.

Wi-Fi Calling uses very little data: around 1MB per minute of call. If you're on a Wi-Fi network that charges by
usage, bear that in mind, but on most home and office broadband it's negligible.

## How do I switch it on?

Wi-Fi Calling is available to all Northwind pay monthly and PAYG customers. You just need to enable it on your phone:

- **iPhone:** Settings > Phone > Wi-Fi Calling, then turn on Wi-Fi Calling on This iPhone.
- **Samsung:** open the Phone app, tap the three dots, then Settings, and turn on Wi-Fi Calling.
- **Google Pixel:** Settings > Network & internet > Calls & SMS > Wi-Fi Calling.

You may be asked to confirm an emergency address. This is the address we'll share with the emergency services if you
call 999 over Wi-Fi and your location can't be found automatically, so please keep it up to date.

When it's working, you'll see "Northwind Wi-Fi" or a small Wi-Fi symbol next to the signal bars.

## Troubleshooting

If Wi-Fi Calling doesn't seem to work:

- Make sure your phone's software is up to date, as older versions may not support our Wi-Fi Calling.
- Restart your phone while connected to Wi-Fi.
- If you use a router from another provider, check it isn't blocking VPN-type traffic. Wi-Fi Calling uses UDP ports
  500 and 4500, and some routers have a setting called SIP ALG that interferes with it.
- Company and public Wi-Fi networks sometimes block Wi-Fi Calling. There's nothing we can do about those, but your
  phone will use the mobile network instead.

A few countries don't allow Wi-Fi Calling, including the United Arab Emirates and China, so it won't work there even
on hotel Wi-Fi.
"""

DOC_HUB_SETUP = """\
Home > Help > Broadband > Setting up your Northwind Hub
Cookie settings | Accept all cookies

SETTING UP YOUR NORTHWIND HUB 4

Your Northwind Hub 4 usually arrives the day before your broadband goes live. Don't worry if you plug it in early: it
simply won't connect until your activation date, and you won't break anything.

WHAT'S IN THE BOX

- Northwind Hub 4
- Power adapter
- Ethernet cable (grey, 2 metres)
- Quick start card with your Wi-Fi name and password
- If your plan includes it, a Wi-Fi Boost disc in a separate box

BEFORE YOU START

Find your ONT box. This is the small white box, usually on the inside of an outside wall, where the fibre cable comes
into your home. If an engineer installed your line, they'll have fitted it and shown you where it is. It has a power
lead and a few status lights, and it needs to stay switched on all the time.

If you're on Home 5G instead of fibre, you don't have an ONT. Skip to the Home 5G section below.

CONNECTING THE HUB

1. Plug the grey Ethernet cable into the port marked WAN on the back of the Hub (it's the red one).
2. Plug the other end into the port marked LAN 1 on your ONT box.
3. Connect the power adapter to the Hub and switch it on at the wall.
4. Wait for the light on the front of the Hub to turn solid white. This takes up to ten minutes the first time,
   because the Hub downloads its latest software. Don't switch it off during this time.

If the light turns solid white, you're online. If it flashes orange for more than 15 minutes, check both ends of the
grey cable are firmly plugged in and that the ONT's lights are on.

CONNECTING YOUR DEVICES

Your Wi-Fi name (it starts with Northwind-) and password are printed on the card in the box and on the sticker on the
back of the Hub. On a phone, you can also scan the QR code on the sticker to join without typing the password.

For the best speeds on computers, games consoles and smart TVs, use an Ethernet cable. The Hub has four Gigabit
ports and one 2.5 Gigabit port (marked 2.5G), which you should use for your fastest device if you're on Fibre 900.

CHANGING YOUR SETTINGS

You can change your Wi-Fi name and password, set up a guest network or turn on parental controls in two ways:

- In the My Northwind app under Broadband > My Hub. This is the easiest way for most people.
- In a web browser, by going to hub.home while connected to your Hub. Log in with the admin password on the sticker.

We recommend keeping the default Wi-Fi password unless you have a good reason to change it, since it's long and
random. If you do change it, choose something at least 12 characters long.

HOME 5G

Place your Home 5G router near a window, ideally on an upper floor facing the direction of the nearest mast. The
app's Placement helper uses the router's signal readings to guide you to the best spot. Plug in the power and wait
for the light on top to turn solid white.

TROUBLESHOOTING

- Solid red light: no connection to the network. Restart the Hub and check the cables.
- Flashing white: the Hub is updating. Leave it alone for a few minutes.
- No lights: check the power adapter and the socket.

If you're still stuck, start a chat in the My Northwind app or call 150 from a Northwind mobile.

Share on Facebook   Share on X   Print this page
Was this helpful? Yes / No
Cookie settings   Privacy   Terms
"""

DOC_APN = """\
# Mobile data and MMS settings (APN)

Your phone needs a few settings, known as APN settings, to connect to Northwind's mobile data and picture messaging
services. Nearly all phones set these up automatically when you put in a Northwind SIM or activate an eSIM, so you
only need this page if mobile data or picture messages aren't working.

## The settings

| Setting | Value |
|---|---|
| APN name | Northwind |
| APN | northwind.net |
| Username | (leave blank) |
| Password | (leave blank) |
| MMSC | http://mms.northwind.net/servlets/mms |
| MMS proxy | mmsproxy.northwind.net |
| MMS port | 8080 |
| Authentication type | None |
| APN type | default,supl,mms |
| APN protocol | IPv4/IPv6 |

## Adding the settings on Android

1. Go to Settings, then Connections or Network & internet, then Mobile networks.
2. Tap Access Point Names.
3. Tap Add or the plus sign, and enter the settings above.
4. Save, then select the new Northwind APN so the circle next to it is filled in.
5. Restart your phone.

## Adding the settings on iPhone

On iPhone, APN settings are delivered automatically through a carrier settings update and usually can't be changed.
If mobile data isn't working, go to Settings > General > About and wait a few seconds: if an update is available,
you'll be asked to install it. If there's no update, try resetting your network settings.

## Tablets, routers and other devices

Unlocked tablets, mobile Wi-Fi devices and 4G routers sometimes need the APN entered by hand. Use the same APN,
northwind.net, and leave the username and password blank. If the device asks for an IP type, choose IPv4v6.

## Still not working?

If you've entered the settings and data still won't connect, check that mobile data is switched on, that you haven't
reached your Spend Cap or used up your data allowance, and that your account isn't barred. The My Northwind app shows
all three on its home screen.
"""

DOC_TRAVEL = """\
Home > Help > Roaming > Before you travel

# Travelling abroad: your checklist

Whether it's a weekend in Lisbon or a month in Tokyo, a few minutes of preparation before you leave can save you money
and hassle. Here's everything we'd suggest checking.

## Two weeks before you go

**Check your destination's Roam Zone.** Open the My Northwind app and go to Roaming > Where I'm going. Type the country
and you'll see which Roam Zone it's in, whether your plan includes it and what a Travel Pass costs. Some places are
handled differently from what you might expect: Jersey, Guernsey and the Isle of Man are in Roam Zone 1, for example,
not part of your UK allowance.

**Make sure your account is in good shape.** Roaming is switched off automatically on accounts with an overdue
balance, so check your last bill has been paid.

**Think about a Spend Cap.** If you're worried about surprise charges, set a Spend Cap in the app. It covers
everything outside your plan, including Travel Passes.

**Check your phone is unlocked** if you plan to use a local SIM as well. Phones sold since December 2021 are already
unlocked.

## The day before

- Switch on Wi-Fi Calling, so you can make calls over hotel and cafe Wi-Fi at UK rates.
- Turn off automatic app updates and cloud photo backups over mobile data, or limit them to Wi-Fi. These are the most
  common cause of unexpected data use abroad.
- Download maps, playlists and films for offline use.
- Make a note of 150, our free customer services number from abroad, and the local emergency number. In the EU it's
  112.

## When you land

Turn your phone on and give it a minute to find a partner network. You'll get a welcome text confirming your Roam Zone
and prices. If you need mobile data, check that data roaming is switched on in your settings; it's off by default on
many phones.

If you're in Roam Zone 2 or 3 and have a Travel Pass, it starts the first time you use your phone, not when you land.
Simply receiving a text doesn't start it.

## While you're away

- Keep an eye on the usage texts we send. In Roam Zone 1 we'll tell you when you've used 80% and 100% of the 25GB
  fair use limit.
- If your data stops working, toggle Airplane mode and try selecting a different network manually.
- On cruise ships and planes, keep Airplane mode on unless you're happy to pay satellite rates.

## If your phone is lost or stolen abroad

Contact us as soon as possible so we can bar your SIM and block the phone. You can do this by calling 150 from
someone else's Northwind phone, or through the My Northwind app or website on any device. If you have DeviceCare,
your policy covers loss and theft abroad on trips of up to 60 days.

## Coming home

There's nothing you need to do. Your phone will reconnect to our network automatically when you're back in the UK,
and Travel Pass charges stop.

Share on Facebook | Share on X | Copy link
"""

DOC_SWITCHING = """\
# Switching to Northwind: bringing your number and broadband with you

Moving to a new provider has become much simpler in the last few years. You no longer need to call your old provider
and explain why you're leaving, and in most cases you won't be without service for more than a few hours.

## Bringing your mobile number

To keep your number, you need a Porting Authorisation Code (PAC) from your current provider. You can get one for free
by texting PAC to 65075 from the phone you want to move. You'll receive the code by text within a minute, along with
information about any early termination charges and outstanding balances.

When you join Northwind, enter the PAC and the number at checkout, or give them to the person helping you in store.
We'll arrange the switch for the next working day, or a later date if you prefer. On the day, your old SIM will stop
working and your Northwind SIM will take over your number, usually by mid-afternoon. Calls may drop for a short
period, but texts won't be lost.

A PAC is valid for 30 days. If it expires, just request another one.

If you'd like a new Northwind number instead, and you want to end your old contract, text STAC to 75075 to get a
Service Termination Authorisation Code. Give us the STAC and we'll end your old contract for you.

## Bringing your broadband

If you're switching home broadband to Northwind Fibre, you don't need to contact your current provider at all. Under
the One Touch Switch process, we'll find your existing service, tell your current provider about the switch and agree
a date. Your old provider will write to you with any costs of leaving. Your old service stops on the day your
Northwind service starts, so the gap is usually just the time it takes to plug in your new Hub.

If you have a home phone number with your old provider, we can bring it across as part of the same switch, as long
as you choose Northwind Home Phone.

## Things to check before you switch

- **Your contract end date.** If you're still within your minimum term, you'll pay early termination charges. Your
  PAC text or switching letter tells you how much.
- **Any phone you're paying off.** A separate device agreement with your old provider will usually continue until
  it's paid off, even after you leave.
- **Email addresses.** If you use an email address provided by your old broadband company, check how long you can
  keep it, and update your important accounts before you switch.
- **Phones bought from your old provider.** Most phones sold since December 2021 are unlocked. If yours is older, ask
  your old provider for an unlock code before you leave.

## Need help?

Our team can check your current contract status with you and talk you through the options. Start a chat in the app
or visit any Northwind store.
"""

DOC_OUTAGES = """\
NETWORK OUTAGES AND PLANNED MAINTENANCE

How we keep you informed when something goes wrong with the network, and what you're entitled to.

Finding out about problems

We publish live information about faults and planned work in the Service status section of the My Northwind app and
on our website. You can search by postcode or choose a saved location, such as home or work. Each entry shows which
services are affected (calls, texts, data or broadband), when the problem started and when we expect it to be fixed.

If you'd like to be told automatically, turn on Service alerts in the app. We'll send a notification when a problem
is found near your saved locations and again when it's resolved.

Planned maintenance

To upgrade and maintain the network, we sometimes need to switch equipment off for a short time. We do most planned
work between midnight and 6am, when the fewest people are affected, and we usually give at least seven days' notice
in Service status. Larger upgrades, such as adding 5G to a mast, can take several days, but neighbouring masts
usually keep most of the area covered.

Unplanned outages

Faults can be caused by power cuts, storm damage, vandalism, cable theft or equipment failures. Our network
operations centre monitors every mast around the clock and sends engineers automatically when something fails.
Simple faults are often fixed remotely within an hour. Faults that need an engineer on site, particularly in remote
areas, can take longer, and we'll keep Service status updated as we learn more.

Compensation

If your home broadband stops working and isn't fixed within two full working days, you'll receive automatic
compensation for each day of delay. You don't need to claim: the credit will appear on your next bill.

For mobile outages, we look at compensation case by case. If you've been without service for an extended period
because of a fault on our network, get in touch and we'll review your account. We may add a credit, or let you end
your contract without charges if the problem can't be fixed.

Emergency calls

During an outage, you can still call 999 or 112 as long as any mobile network is available in your area. Your phone
will use another network automatically for emergency calls.
"""

DOC_PARENTAL = """\
KEEPING CHILDREN SAFE ON NORTHWIND

Giving a child their first phone is a big step. Northwind has a range of free tools to help you control what they can
see, spend and do, and you can manage all of them from your own My Northwind app.

CONTENT LOCK
Every new Northwind line starts with Content Lock switched on. It blocks websites and services rated 18+, including
adult content, gambling and some violent material, when browsing over our mobile network. It doesn't filter Wi-Fi, so
you'll need your home router's parental controls for that. The Northwind Hub includes a Family filter you can turn on
under Broadband > My Hub > Parental controls. To turn Content Lock off, the account holder needs to prove they're over
18, which we do with a quick credit card check or in store with photo ID.

SPENDING
Children's lines can run up bills quickly through in-app purchases and premium-rate services. We recommend:
- setting a Spend Cap of £0, so nothing outside the plan can be charged;
- turning off third-party purchases, so app store and game payments can't be added to the bill;
- adding a premium-rate bar, which stops calls and texts to 09 numbers and premium short codes.
All three are free and can be set for each line separately under Account > Manage lines.

ROAMING
A roaming bar stops the phone using mobile networks abroad. It's handy if your child goes on a school trip and you'd
rather they only used Wi-Fi.

LOCATION AND SCREEN TIME
We don't provide our own location tracking, but the screen time and family features built into iPhone and Android
phones work on any network. Apple's Family Sharing and Google's Family Link let you set app limits, approve downloads
and see the phone's location.

TALKING TO YOUR CHILD
No filter is perfect. The most effective protection is an open conversation about what they do online, who they talk
to and what to do if something upsets them. Make sure they know they can come to you without getting into trouble.
Organisations such as Childnet and the NSPCC publish helpful guides for parents.

REPORTING
If your child receives messages that worry you, you can forward suspicious texts to 7726 for free. For anything that
might be illegal, contact the police.
"""

DOC_SCAMS = """\
# Scam calls and texts: how to spot them and protect yourself

Criminals often pretend to be from a phone company, a bank or a delivery firm to trick people into handing over money
or personal details. They're getting more convincing, but most scams share a few tell-tale signs.

## What Northwind will never do

- We'll never ask for your full password, your PIN or a one-time code by phone, text or email.
- We'll never send a link in a text asking you to log in or enter payment details.
- We'll never ask you to move money to a "safe account" or to pay a bill with gift cards or cryptocurrency.
- We'll never call to say your account will be closed unless you act immediately.

If a message or call asks for any of these, it isn't us, whatever number it appears to come from.

## Common scams

**Fake bill texts.** A text says your payment failed or your bill is overdue, with a link to a convincing copy of our
website. Anything you enter there goes straight to the criminals.

**Upgrade calls.** A caller offers an amazing upgrade deal and asks for your account details and a one-time code "to
verify you". With those, they can order a phone on your account and have it delivered elsewhere.

**SIM swap fraud.** Someone who has some of your personal details contacts us pretending to be you and asks for a
replacement SIM. If it works, your calls and texts go to them, including security codes from your bank. We protect
against this with security questions, one-time codes and extra checks on replacement SIM requests, and you can add a
Port and SIM Lock in the app for extra protection.

**Missed call scams.** Your phone rings once from an unfamiliar international number. If you call back, you may be
connected to an expensive premium-rate line. Don't return calls from numbers you don't recognise.

## How to report scams

Forward suspicious texts to 7726 (it spells SPAM on a keypad). It's free, and it helps us and other networks block the
sender. For scam calls, note the number and the time, then report it in the app under Help > Report a scam call.

If you've lost money, contact your bank immediately and report it to Action Fraud.

## If you think you've been caught out

Don't be embarrassed; these scams catch out careful people every day. Act quickly:

1. If you shared bank or card details, call your bank using the number on the back of your card.
2. If you shared your Northwind password or a one-time code, change your password in the app and tell us, so we can
   check your account for changes and add extra security.
3. If your phone suddenly loses signal and shows "SOS only" for no obvious reason, contact us from another phone
   straight away. It can be a sign that someone has swapped your SIM.

## Scam Shield

Scam Shield is a free Northwind service that filters known scam texts before they reach your phone and labels
suspected scam calls as "Suspected spam". It's switched on for all new customers. You can check or change it in the
app under Account > Security.
"""

DOC_DATA_USAGE = """\
# Managing your data usage

Running out of data before the end of the month is frustrating, and so is paying for much more than you use. Here's
how to keep track of your data and make it go further.

## Check what you've used

The home screen of the My Northwind app shows your data used and remaining, updated every few minutes, along with the
date your allowance renews. Tap the data bar to see daily usage for the last 30 days. Your phone also keeps its own
record, broken down by app: look under Mobile Data (iPhone) or Data usage (Android). Your phone's count can differ
slightly from ours, because it may reset on a different day.

We'll text you when you've used 80% and 100% of your allowance. If you'd prefer different alerts, change them in the
app under Account > Notifications.

## What uses the most data?

Roughly, per hour:

- Streaming video in HD: 1.5 to 3GB (4K can use 7GB or more)
- Video calls: 0.5 to 1.5GB
- Streaming music: 50 to 150MB
- Social media with autoplay video: 500MB to 1GB
- Web browsing and email: 50 to 100MB

Background activity adds up too: app updates, photo and video backups and podcast downloads can use several gigabytes
a month without you noticing.

## Ways to save data

- Set app updates and cloud backups to Wi-Fi only.
- Turn off video autoplay in social media apps, or set it to Wi-Fi only.
- Lower the streaming quality in video apps when you're on mobile data. Most let you choose a separate setting for
  mobile.
- Download playlists, films and maps on Wi-Fi before you travel.
- Use Wi-Fi at home and at work, and check your phone actually joins it; a forgotten password means your phone
  quietly uses mobile data instead.

## What happens when I run out?

On Breeze plans, when you've used your allowance your data stops until your next renewal date, unless you add a data
bolt-on. Bolt-ons start at £3 for 2GB and last until the end of your current month. Calls and texts keep working as
normal. On PAYG, you can buy another bundle at any time from your credit.

If you regularly run out, moving to a bigger plan is usually cheaper than buying bolt-ons, and you can move up at any
time without extending your contract.
"""

# Written in cp1252 (the Windows "ANSI" code page a CMS export might use): curly quotes, dashes, bullets, café/naïve.
DOC_HOTSPOTS = """\
NORTHWIND WI-FI HOTSPOTS — FREE WI-FI ON THE GO

Northwind customers can connect for free to more than 2,000 Wi-Fi hotspots across the UK, in railway stations,
shopping centres, libraries and hundreds of independent cafés. Look for the network called “Northwind Wi-Fi”.

HOW TO CONNECT
The first time you connect, open the My Northwind app and tap Hotspots > Set up automatic connection. Your phone will
then join Northwind Wi-Fi automatically whenever you’re in range, using your SIM to sign in securely. There’s no
password to remember and nothing to pay.

Hotspot usage doesn’t count towards your data allowance, and speeds are typically 20–50Mbps, though they depend on
how busy the hotspot is.

WHERE TO FIND THEM
The Hotspots map in the app shows every location, with opening hours where relevant. Our partner café chain, Café
Rosé, has hotspots in all 140 of its branches, and most mainline railway stations are covered on the concourse and
the platforms.

STAYING SAFE ON PUBLIC WI-FI
It would be naïve to assume any public Wi-Fi is completely private. Northwind Wi-Fi encrypts the connection between
your phone and the hotspot, which is more than many free networks do, but we still recommend:
• only entering passwords on websites and apps that use HTTPS (look for the padlock);
• avoiding online banking on other providers’ hotspots that don’t need a password;
• keeping your phone’s software up to date;
• turning off automatic connection to open networks you don’t recognise.

If you see a network with a similar name, such as “Northwind Free WiFi” or “Northwind-Guest”, be cautious. Criminals
sometimes set up look-alike hotspots to capture people’s data. The genuine network is always called “Northwind
Wi-Fi”, and it never asks for your card details.

FAIR USE
Hotspots are for short-term use while you’re out and about. Very heavy use, such as downloading large files for hours
at a time, may be limited to keep the service fair for everyone.

Questions? Ask us in the My Northwind app.
"""

DOC_ACCESSIBILITY = """\
# Accessibility and Extra Help

We want everyone to be able to use Northwind services with confidence. If you have a disability or a health
condition, or your circumstances are making things harder for a while, there's a range of support available. Just
tell us what would help.

## Priority Care register

If you tell us about your needs, we'll add you to our Priority Care register, with your permission. That lets us:

- prioritise repairs if you rely on your broadband or landline for health reasons, for example a telecare alarm;
- send bills and letters in a format that works for you;
- make sure anyone you speak to knows how best to communicate with you, so you don't have to explain every time;
- add a trusted person to your account who can manage it on your behalf.

You can join the register in the app under Account > Support needs, in any store, or by calling 150.

## Bills and information in other formats

We can provide bills, contracts and letters in large print, Braille or audio, or as accessible PDFs that work with
screen readers. These are always free.

## Hearing and speech

We support Relay UK, which lets people who are deaf, hard of hearing or speech-impaired communicate with us through a
relay assistant. Our chat service in the app is also available every day from 8am to 10pm. You can contact the
emergency services by text if you register with the emergencySMS service first.

## Free directory enquiries

If you find it hard to use a printed directory because of a disability, you can register for our free directory
enquiries service, which connects you to any UK number at no cost.

## Extra Help with bills

Life doesn't always go to plan. If you're struggling to pay your bill because of a job loss, illness, bereavement or
any other change in circumstances, please get in touch as early as possible. Our Extra Help team can:

- set up a payment plan to spread what you owe over several months;
- move you to a cheaper plan without an early termination charge;
- pause late payment fees while we agree a plan together;
- point you towards free, independent debt advice.

Customers who receive Universal Credit, Pension Credit or certain other benefits can also apply for our social
tariff, Northwind Essentials, which gives you unlimited calls and texts and 40GB of data for £10 a month, or fibre
broadband for £15 a month.

## Stores and accessibility

All our stores have step-free access, and most have hearing loops. If you'd like a quieter appointment, book a time
in the app and let us know; we'll do our best to arrange a calmer time of day.
"""

DOC_5G_DE = """\
# 5G einfach erklärt

5G ist die fünfte Generation des Mobilfunks. Wie 4G überträgt es Anrufe, Nachrichten und Daten zwischen Ihrem
Smartphone und unseren Sendemasten, allerdings deutlich schneller und mit viel geringerer Verzögerung. In diesem
Artikel erklären wir, was das im Alltag bedeutet und was Sie brauchen, um 5G bei Northwind Mobile zu nutzen.

## Was ist der Unterschied zu 4G?

Im Netz von Northwind erreicht 5G typischerweise Downloadgeschwindigkeiten von 150 bis 400 Mbit/s, in Innenstädten
auch mehr als 1 Gbit/s. Mit 4G sind es meist 20 bis 60 Mbit/s. Ein zweistündiger Film in HD-Qualität ist mit gutem 5G
in weniger als einer Minute heruntergeladen.

Noch wichtiger ist für viele die Latenz, also die Zeit, die das Netz braucht, um auf eine Anfrage zu reagieren. Bei
4G liegt sie bei 40 bis 60 Millisekunden, bei unserem 5G bei etwa 15 bis 25 Millisekunden. Das merken Sie vor allem
bei Onlinespielen und Videoanrufen.

Außerdem kann 5G viel mehr Geräte gleichzeitig versorgen. Das hilft in Stadien, auf Festivals und an großen
Bahnhöfen, wo 4G-Netze oft überlastet sind.

## Was brauche ich für 5G?

Sie brauchen drei Dinge: ein 5G-fähiges Smartphone, einen Tarif mit 5G und 5G-Empfang an Ihrem Standort. 5G ist in
allen Northwind-Tarifen ohne Aufpreis enthalten, außer in Breeze 10GB und Breeze Lite. Ob an Ihrer Adresse 5G
verfügbar ist, zeigt unsere Netzabdeckungskarte für jede Postleitzahl.

Wenn Ihr Telefon trotzdem nur 4G anzeigt, prüfen Sie die Netzeinstellungen. Manche Geräte werden mit ausgeschaltetem
5G ausgeliefert. Wählen Sie unter „Bevorzugter Netztyp“ die Option „5G automatisch“.

## Ist 5G sicher?

Ja. 5G nutzt Funkwellen, genau wie 4G, WLAN und UKW-Radio. Diese Strahlung ist nicht ionisierend und kann weder
Zellen noch das Erbgut schädigen. Alle unsere Sendeanlagen halten die internationalen Grenzwerte der ICNIRP deutlich
ein, und unabhängige Messungen in der Nähe von 5G-Standorten liegen regelmäßig weit unter diesen Werten.

## Wo gibt es 5G?

Unser 5G-Netz erreicht inzwischen mehr als 80 Prozent der britischen Bevölkerung, darunter alle Großstädte und die
meisten größeren Orte. Jede Woche kommen neue Standorte hinzu, und auf dem Land wächst die Abdeckung vor allem über
das 700-MHz-Band. Wenn Sie möchten, benachrichtigen wir Sie, sobald 5G in Ihrer Gegend verfügbar ist.
"""

DOC_ROAMING_ES = """\
# Guía de itinerancia: cómo usar tu móvil Northwind en el extranjero

¿Te vas de viaje? Con Northwind Mobile puedes usar tu móvil en más de 190 países. Esta guía explica cómo funciona la
itinerancia, cuánto cuesta y qué hacer si algo no funciona.

## Las zonas de itinerancia

Agrupamos los destinos en tres Roam Zones. La Roam Zone 1 incluye la Unión Europea, además de Noruega, Islandia,
Suiza y Turquía. Con las tarifas Gale puedes usar allí tus minutos, mensajes y datos sin coste adicional, igual que en
el Reino Unido. Con las tarifas Breeze pagas 2 libras al día, y solo los días en que usas el teléfono.

La Roam Zone 2 incluye más de 60 destinos, como Estados Unidos, Canadá, Australia y Japón. Allí necesitas un Travel
Pass de 5 libras al día, salvo con Gale Unlimited Max, que ya lo incluye. La Roam Zone 3 es el resto del mundo, y el
Travel Pass cuesta 8 libras al día.

## Antes de salir

- Comprueba en la app My Northwind en qué zona está tu destino.
- Activa las llamadas por Wi-Fi: las llamadas a números del Reino Unido por Wi-Fi se cobran como si estuvieras en
  casa.
- Configura las actualizaciones de aplicaciones y las copias de seguridad para que solo usen Wi-Fi.
- Si quieres evitar sorpresas, establece un límite de gasto con Spend Cap.

## Al llegar

Enciende el teléfono y espera un minuto a que se conecte a una red asociada. Recibirás un SMS de bienvenida con los
precios de tu zona. Para usar datos móviles, asegúrate de que la itinerancia de datos está activada en los ajustes
del teléfono.

## Si los datos no funcionan

Activa el modo avión durante 30 segundos y vuelve a desactivarlo. Si sigue sin funcionar, selecciona manualmente otra
red en los ajustes y comprueba que el APN es northwind.net. Si el problema continúa, abre un chat en la app desde una
red Wi-Fi y podremos actualizar tu perfil de itinerancia a distancia.

## Límite de uso razonable

En la Roam Zone 1 puedes usar hasta 25 GB de datos al mes. Si superas ese límite, cada GB adicional cuesta 3,50
libras. Te avisaremos por SMS cuando llegues al 80 % y al 100 % del límite, para que no haya sorpresas en tu factura.
"""

DOC_JUNK_SYMBOLS = """\
# ¤¤¤ ### ¤¤¤

| § | ¶ | † | ‡ | ※ | ¤ |
|---|---|---|---|---|---|
| ### | @@@ | %%% | &&& | *** | ~~~ |
| <<< | >>> | ^^^ | $$$ | ||| | ::: |
| !!! | ??? | +++ | === | --- | ___ |
| ¤§¶ | †‡※ | @#% | &*~ | <>^ | $|: |
| ░░░ | ▒▒▒ | ▓▓▓ | ███ | ▀▀▀ | ▄▄▄ |
| ◆◇◆ | ○●○ | □■□ | △▲△ | ▽▼▽ | ☆★☆ |
| #@! | %^& | *() | _+= | {}[] | ;:' |
| ~~~ | ``` | ''' | ,,, | ... | /// |
| ¤ ¤ | § § | ¶ ¶ | † † | ‡ ‡ | ※ ※ |
| 0x0 | 1x1 | 0x1 | 1x0 | 0x0 | 1x1 |
| ░▒▓ | ▓▒░ | ░▒▓ | ▓▒░ | ░▒▓ | ▓▒░ |
| ### | ### | ### | ### | ### | ### |

=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+
~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*
"""

DOC_JUNK_LINKS = """\
https://www.northwindmobile.example/help
https://www.northwindmobile.example/help/billing
https://www.northwindmobile.example/help/billing/pay-my-bill
https://www.northwindmobile.example/help/billing/itemised-bill
https://www.northwindmobile.example/help/roaming
https://www.northwindmobile.example/help/roaming/travel-pass
https://www.northwindmobile.example/help/roaming/zones?zone=1
https://www.northwindmobile.example/help/roaming/zones?zone=2
https://www.northwindmobile.example/help/roaming/zones?zone=3
https://www.northwindmobile.example/help/broadband
https://www.northwindmobile.example/help/broadband/hub-4
https://www.northwindmobile.example/help/broadband/wifi-boost
https://www.northwindmobile.example/help/devices/flex-pay
https://www.northwindmobile.example/help/devices/unlock
https://www.northwindmobile.example/help/esim
https://www.northwindmobile.example/help/esim/qr-code
https://www.northwindmobile.example/plans/gale-unlimited
https://www.northwindmobile.example/plans/gale-unlimited-max
https://www.northwindmobile.example/plans/breeze-10gb
https://www.northwindmobile.example/plans/breeze-30gb
https://www.northwindmobile.example/coverage?postcode=
https://www.northwindmobile.example/status
https://cdn.northwindmobile.example/assets/css/site.min.css
https://cdn.northwindmobile.example/assets/js/site.min.js
https://cdn.northwindmobile.example/assets/img/northwind-logo.svg
https://community.northwindmobile.example/t/roaming/1182
https://community.northwindmobile.example/t/hub-4-firmware/2290
https://community.northwindmobile.example/t/esim-transfer/3014
https://www.northwindmobile.example/sitemap.xml
https://www.northwindmobile.example/robots.txt
"""

# name -> (text, encoding, line ending); the English articles first, then the planted oddities.
DOCS = {
    "what-is-5g.md": DOC_5G,
    "fair-usage-policy.md": DOC_FAIR_USE,
    "coverage-and-signal.md": DOC_COVERAGE,
    "troubleshooting-no-signal.txt": DOC_NO_SIGNAL,
    "slow-broadband.md": DOC_SLOW_BROADBAND,
    "wifi-calling.md": DOC_WIFI_CALLING,
    "setting-up-your-hub.txt": DOC_HUB_SETUP,
    "apn-settings.md": DOC_APN,
    "travelling-abroad-checklist.md": DOC_TRAVEL,
    "switching-to-northwind.md": DOC_SWITCHING,
    "network-outages-and-maintenance.txt": DOC_OUTAGES,
    "parental-controls.txt": DOC_PARENTAL,
    "scam-calls-and-texts.md": DOC_SCAMS,
    "managing-data-usage.md": DOC_DATA_USAGE,
    "wifi-hotspots.txt": DOC_HOTSPOTS,
    "accessibility-and-extra-help.md": DOC_ACCESSIBILITY,
    "5g-erklaert.md": DOC_5G_DE,
    "guia-itinerancia.md": DOC_ROAMING_ES,
    "symbols-table.md": DOC_JUNK_SYMBOLS,
    "links.txt": DOC_JUNK_LINKS,
}
DOC_DUPLICATE = ("what-is-5g.md", "5g-guide.md")  # the same article saved twice under two names
DOC_CP1252 = "wifi-hotspots.txt"
DOC_CRLF = "parental-controls.txt"
DOC_NON_ENGLISH = {"5g-erklaert.md": "de", "guia-itinerancia.md": "es"}
DOC_JUNK = ["symbols-table.md", "links.txt"]
DOC_BOILERPLATE = ["slow-broadband.md", "setting-up-your-hub.txt", "travelling-abroad-checklist.md"]


def build_docs() -> dict[str, bytes]:
    files = {}
    for name, text in DOCS.items():
        if name == DOC_CRLF:
            text = text.replace("\n", "\r\n")
        files[name] = text.encode("cp1252" if name == DOC_CP1252 else "utf-8")
    original, copy = DOC_DUPLICATE
    files[copy] = files[original]
    return files


# --------------------------------------------------------------------------------------------------------------------
# Support chats (raw/chats/transcripts.jsonl)
#
# Source format: "=== topic | opening question" starts a template; "@ zones: 2 3" limits the roaming destinations;
# "+ " is a good agent reply, "- " a poor one (vague, unhelpful or wrong), "! " a supervisor's reply after an
# escalation; indented lines continue the previous reply. {placeholders} are filled per customer; PII placeholders
# are name, title_surname, email, phone, card, iban, ip and router_url.
# --------------------------------------------------------------------------------------------------------------------

CHAT_TEMPLATES = """
=== roaming | Hi, my name is {name}. My data stopped working since I landed in {country}. Can you help?
+ I'm sorry about that, {title_surname}. {country} is in Roam Zone {zone}, so your line works there. First, please
  check that data roaming is switched on in your phone's settings, then turn Airplane mode on for 30 seconds and off
  again. If it still won't connect, turn off automatic network selection and pick a different local network from the
  list. I've also refreshed your roaming profile from our side, which fixes most cases within five minutes.
+ Let's get that sorted. I can see your line registered on a partner network in {country} about an hour ago, so the
  connection to us is fine. The most common cause is the APN: please go to your mobile data settings and check the
  access point name is northwind.net. If it's blank or says something else, change it, save it and restart your
  phone. Data should come back straight away.
+ Thanks for getting in touch, {title_surname}. {country} is in Roam Zone {zone}, and because your Spend Cap is set to
  £0, data abroad is blocked until a Travel Pass is added. You can add one in the My Northwind app under Roaming, or I
  can add it for you now. It's only charged on the days you actually use your phone abroad.
- Have you tried turning your phone off and on again? It should work.
- Unfortunately your plan doesn't include roaming in {country}, so there's nothing I can do. You'll need to use Wi-Fi
  until you're back in the UK.
! Hi {title_surname}, I'm a team leader and I've picked up this chat. I'm sorry, the earlier advice wasn't right:
  {country} is in Roam Zone {zone} and roaming is active on your account. I've reset your connection on our side.
  Please restart your phone and make sure data roaming is on. If it still doesn't connect, choose a partner network
  manually in your settings. I'll stay in the chat while you try.

=== roaming | Hello, this is {name}. I'm going to {country} next week. Will my plan work there or do I need to buy something?
+ Good question, {title_surname}. {country} is in Roam Zone {zone}. {zone_advice} Make sure data roaming is switched
  on before you land, and you'll get a welcome text with the prices when you arrive.
+ You're nearly all set, {title_surname}. {country} is in Roam Zone {zone}. {zone_advice} Before you go, switch on
  Wi-Fi Calling too, so calls over hotel Wi-Fi come out of your normal allowance. I've texted you the roaming details
  so you have them handy.
+ Thanks for checking before you travel, that's always the best way. {country} is in Roam Zone {zone}. {zone_advice}
  You can check all of this under Roaming in the My Northwind app. If you'd like a safety net, I can also set a Spend
  Cap so you can't be charged more than an amount you choose.
- It should probably be fine, most countries work.
- You'll need to buy a local SIM card when you get there. We don't really do roaming in {country}.
! Hi {title_surname}, I'm a supervisor and I've read back through the chat. Apologies for the confusion: you don't
  need a local SIM. {country} is in Roam Zone {zone}. {zone_advice} I've added a note to your account and texted you
  the details.

=== roaming | I just got a text saying I've been charged for roaming in {country} but I thought it was included. My number is {phone}.
@ zones: 2 3
+ Thanks, I've found your account. {country} is in Roam Zone {zone}, and the text was about a Travel Pass that
  started when your phone first used data there. Your plan doesn't include that zone, so the daily pass of £{pass_price}
  applies, but it's only charged on days you use your phone. If you'd like a limit, I can set a Spend Cap so you're
  never charged more than an amount you choose.
+ I've checked the charges on {phone}. You were charged twice yesterday for a Travel Pass because your phone briefly
  connected to a network across the border as well. That's our mistake, and I've refunded the duplicate charge; you'll
  see the credit on your next bill. From now on you'll only pay once per day, wherever you are.
+ I understand the confusion. Roaming is included in Roam Zone 1 on Gale plans, but {country} is in Roam Zone {zone},
  so a Travel Pass applies there. The text was just confirming today's pass. You won't be charged again until
  tomorrow, and only if you use your phone. I've also turned on a daily usage text so you can keep track while
  you're away.
- All the charges look correct as far as I can see.
- Roaming is never included on any of our plans, so that charge is right.
! Hello, I'm a team leader and I'm taking over this chat. I'm sorry, the information you were given wasn't accurate.
  {country} is in Roam Zone {zone}, which isn't included on your plan, so a Travel Pass applies at £{pass_price} a
  day. As the charge came as a surprise, I've refunded today's pass as a goodwill gesture and added a roaming usage
  alert to {phone}.

=== roaming | Hi, I'm {name}. Can I call UK numbers from {country} without paying extra?
+ Yes, {title_surname}. {country} is in Roam Zone {zone}. {zone_advice} To call a UK number, dial it with +44 instead
  of the first 0. Calls to 150 to reach us are always free, wherever you are.
+ Good news: if you're on Wi-Fi, Wi-Fi Calling lets you call UK numbers from {country} as if you were at home, using
  your normal minutes. Just check it's switched on in your phone's settings before you go. Away from Wi-Fi, {country}
  is in Roam Zone {zone}. {zone_advice}
+ It depends on where you are and on your plan. {country} is in Roam Zone {zone}, so here's how it works for you.
  {zone_advice} Receiving calls is free in Zone 1 and included with a Travel Pass elsewhere. Watch out for calls
  going to voicemail while you're away, as they can be charged twice.
- Calls from abroad are charged at the standard rate.
- No, all calls from abroad cost £2 a minute.
! Hi {title_surname}, I'm a supervisor. Sorry, the last reply was wrong. {country} is in Roam Zone {zone}.
  {zone_advice} Wi-Fi Calling is also a good option, because calls over Wi-Fi to UK numbers use your normal allowance
  wherever you are.

=== billing | Hi, my name is {name}. My bill this month is much higher than usual and I don't understand why.
+ Thanks, {title_surname}. I've looked at your latest bill, and the extra £{amount} comes from calls to an 0906
  number on the 14th. That's a premium-rate service, which isn't part of any allowance. If you don't recognise those
  calls, let me know and I'll raise a dispute. I can also add a premium-rate bar so it can't happen again.
+ I've checked your bill and I can see why it looks higher. This month includes a one-off pro rata charge because
  you moved to a bigger plan on the 9th, plus £{amount} for a game subscription bought through Google Play and
  charged to your bill. Your next bill should be back to your usual amount. If the subscription wasn't you, I can
  block third-party purchases.
+ I'm sorry for the surprise, {title_surname}. The difference is mostly roaming: you used data in Roam Zone 2 on three
  days without a Travel Pass, which was charged per MB. As a one-off, I've applied a credit of £{amount} so you only
  pay what a Travel Pass would have cost, and I've turned on roaming usage alerts for you.
- Bills can vary from month to month.
- It's probably the annual price rise, that happens every year.
! Hi {title_surname}, I'm a team leader. I've gone through your bill line by line. The increase is £{amount} of extra
  data used on the 3rd and 4th after your allowance ran out. Because we didn't send you the usual 100% usage warning,
  I've refunded it in full, and I've set a Spend Cap so it can't happen again.

=== billing | Hi, this is {name}. I want to change the card I pay with. The new one is {card}.
+ Thanks, {title_surname}. For your security, please don't share full card numbers in chat; I've removed it from our
  notes. You can update your payment card safely in the My Northwind app under Account > Billing > Payment method,
  and the change applies from your next bill. If you're moving from Direct Debit to card, the app takes you through
  it step by step.
+ I can help with that. We can't take card details over chat, as it isn't a secure payment channel, so I've masked
  the number you sent. The quickest way is to open the app, go to Billing and tap Change payment card. It takes about
  a minute, and you'll get a confirmation email once it's saved.
+ Thanks for letting us know. To keep your details safe we only take card numbers through our secure payment page,
  so I've just sent you a one-time link by text. It expires in 30 minutes. Once you've entered the new card, your
  next bill on the {day} will be taken from it automatically.
- OK, I've updated it.
- You can't change your card, you have to keep using the same one.
! Hi {title_surname}, I'm a supervisor. Apologies, we shouldn't have accepted card details in chat, and nothing has
  been changed on your account yet. I've deleted the number from our records. Please update your card through the
  secure link I've just texted you, or in the app under Account > Billing > Payment method.

=== billing | Hello, I'd like to set up a direct debit. My IBAN is {iban} and the email on the account is {email}.
+ Thanks, I've found your account under {email}. Please don't send bank details in chat, as it isn't a secure
  channel; I've removed them from our notes. You can set up a Direct Debit in the My Northwind app under Account >
  Billing > Payment method. It takes effect from your next bill, and you'll get an email confirming the mandate
  within three working days.
+ Thank you, I've located your account. Direct Debits with us need a UK bank account, so if that account is held
  outside the UK we won't be able to use it, but a recurring card payment works just as well. If it's a UK account,
  enter it in the app under Billing, where the mandate is set up securely.
+ Happy to help. I've sent a secure Direct Debit link to {email}. Open it within 24 hours, check the bank details and
  confirm. Your first collection will be on your next bill date, and we'll email you at least three working days
  before each payment.
- Done, that's all set up now.
- We don't accept Direct Debit, only cards.
! Hello, I'm a team leader. I'm sorry, the previous reply wasn't correct, and no Direct Debit has been set up yet.
  For your security I've removed the bank details from the chat record. I've emailed a secure link to {email}; once
  you confirm it, the Direct Debit will start from your next bill.

=== billing | My payment failed and now I've got a late fee. I'm {name}, can you remove it?
+ Thanks, {title_surname}. I can see the Direct Debit on the 2nd was returned by your bank, and a £5 late payment fee
  was added. As this is the first time it's happened on your account, I've removed the fee. Please make sure the
  payment goes through before the 20th to avoid any restrictions; you can pay now in the app under Billing.
+ I'm sorry to hear that. Looking at your account, the payment failed because the card on file expired last month.
  I've waived the £5 fee as a one-off. If you update your card in the app today, we'll retry the payment
  automatically tomorrow, and nothing else will be affected.
+ Let me check that for you. The payment failed on the 5th, and we did send reminders, but I appreciate these things
  happen. I've taken the late fee off your account. If money is tight at the moment, our Extra Help team can spread
  the balance over a few months; just say the word and I'll transfer you.
- Late fees can't be removed.
- It's only £5, it'll just be on your next bill.
! Hi {title_surname}, I'm a supervisor and I've reviewed your account. We can remove late fees in cases like this,
  and I've now done so; the credit will show on your next bill. I've also set up a reminder text for three days
  before each payment so you have some notice in future.

=== billing | I was charged twice for my top-up yesterday. I paid with card {card}. Can you refund one of them?
+ Sorry about that. I can see two £10 top-ups on your account a minute apart, and only one was intended. I've
  refunded the second one to your card; it can take three to five working days to appear. For your security, please
  don't send full card numbers in chat. I've masked it in our records.
+ Thanks for flagging it. I've checked, and the second transaction was only an authorisation hold, not a charge. It
  should disappear from your bank statement within five working days. If it's still there after that, get back in
  touch and we'll refund it manually. Also, please avoid sharing full card numbers here; the last four digits are
  plenty.
+ I've had a look and you're right: the payment went through twice because the app timed out. I've refunded £{amount}
  to your card and added a £2 credit for the trouble. Next time, if the app seems stuck, check Billing > Payment
  history before trying again.
- You'll need to contact your bank about that.
- We can't see any double payment.
! Hello, I'm a team leader. I've looked into this properly and can confirm you were charged twice. I'm sorry you were
  told otherwise. I've refunded the duplicate payment today, and I've masked the card number you shared so it isn't
  stored in our chat history.

=== billing | Why did my monthly price go up in April? Nobody told me.
+ I understand it's frustrating. Every April, Northwind airtime prices rise by a fixed amount that's set out in your
  contract summary: £1.50 a month for mobile plans. We sent a text on 1 March to let you know. Your Flex Pay phone
  payments don't change. If your plan no longer suits you, I can show you cheaper options without changing your
  contract length.
+ Thanks for asking. Your price went up by £1.50 because of our annual price change, which is fixed in pounds and
  pence and was listed in the contract summary we emailed when you joined. We also texted all customers at least 30
  days before. If you'd like, I can resend your contract summary so you can see the exact wording.
+ Sorry for the surprise, {title_surname}. The change is our yearly April rise of £1.50 a month, shown in your contract
  summary. Looking at your usage, you only use around 6GB a month, so moving to Breeze 10GB would save you £5 a month
  even after the rise. Would you like me to make that change?
- Prices go up every year, that's just how it is.
- It's inflation, the rise is CPI plus 3.9%.
! Hi, I'm a supervisor. Sorry, that was out-of-date information. Our price rises are a fixed £1.50 a month for mobile
  plans, not linked to inflation, and they're in your contract summary. I've emailed you a copy and added a note to
  review your plan if you'd like to lower your bill.

=== broadband | Hi, I'm {name}. My broadband keeps dropping out every evening. Router IP is {ip} if that helps.
+ Thanks, {title_surname}. I've run a line test and your fibre connection itself is stable, so the drops are on the
  Wi-Fi side. The Hub's log shows it switching Wi-Fi channels around 8pm, when your neighbours' networks are busiest.
  I've fixed it to a clearer channel for you. If you still get drops, a Wi-Fi Boost disc upstairs would help, and I
  can send one out.
+ Thanks for the details. The Hub is reporting a lot of errors on the line between 7pm and 11pm, which points to a
  fault rather than anything you're doing. I've booked an engineer for Thursday between 8am and 1pm, and you'll get
  a text the day before. In the meantime, a wired connection will be more reliable.
+ Sorry you've had this. The Hub at {ip} is running old firmware that had a known issue with evening
  disconnections. I've pushed the update to it now; it will restart in about five minutes, so your internet will
  drop briefly. After that the problem should be gone. I'll check the connection logs again in 48 hours.
- The network is busy in the evenings, that's normal.
- Try moving the router.
! Hi {title_surname}, I'm a team leader. Evening drop-outs aren't normal and you shouldn't have to put up with them.
  I've looked at the logs for the Hub at {ip} and can see repeated disconnections, so I've raised a fault and booked
  an engineer. You'll also get automatic compensation for the days it hasn't worked properly.

=== broadband | My internet is really slow. I'm paying for Fibre 500 but only getting about {speed} Mbps.
+ Thanks for letting me know. Was that speed test on Wi-Fi or with a cable? Wi-Fi speeds are often much lower,
  especially through walls. I've tested the line from our end and it's syncing at 500Mbps, so the connection itself
  is fine. Please try a speed test with a laptop plugged into the Hub. If that's still slow, I'll escalate it to our
  network team.
+ Sorry about that. I can see your Hub is connected at 100Mbps rather than 1Gbps on its network port, which usually
  means an old or damaged Ethernet cable between the Hub and the ONT box. Could you swap it for the cable that came in
  the box, or any Cat6 cable? That should bring your speed back up.
+ I've checked, and there's a known capacity problem at the cabinet serving your street; our engineers are upgrading
  it on Friday. Until then, evening speeds will be lower than they should be. I've applied a £10 credit to your
  account, and if your speed hasn't recovered by Monday, you can leave without any fees.
- Speeds are not guaranteed.
- That's the speed you should expect on Fibre 500.
! Hello, I'm a supervisor. Sorry about the earlier answer. Fibre 500 comes with a minimum guaranteed speed of 350Mbps,
  and {speed}Mbps is well below it. I've raised a speed fault, and if we can't fix it within 30 days, you can leave
  without early termination charges.

=== broadband | I can't get into my router settings. I tried {router_url} but it doesn't load.
+ The Northwind Hub uses a different address: type hub.home into your browser while you're connected to the Hub's
  Wi-Fi. The admin password is on the sticker on the back, under the Wi-Fi password. If you've changed it and can't
  remember it, hold the reset button for 15 seconds, though that will also reset your Wi-Fi name and password.
+ That address is for a different router. On the Northwind Hub 4, go to hub.home instead. If the page still doesn't
  load, make sure you're connected to the Hub itself rather than through a VPN, since that can block the settings
  page. Let me know what you see.
+ Thanks. Please try hub.home in your browser instead. One more tip: once you're in, change the admin password from
  the default under Advanced > Security, and never share it with anyone, including us.
- We don't support router settings.
- Just reset it.
! Hi, I'm a team leader. Sorry for the short answers earlier. The settings page for your Northwind Hub is at hub.home
  rather than the address you tried. Log in with the admin password from the sticker on the back. I've also sent you
  a link to our Hub guide by text.

=== broadband | Hi, this is {name}. I'm moving house next month. How do I move my broadband?
+ Congratulations on the move, {title_surname}! You can tell us your new address in the My Northwind app under Moving
  home. We need at least two weeks' notice. Full fibre is available at most addresses in your area, so we can usually
  connect you on the day you move in. Your plan and price stay the same.
+ Thanks for letting us know early. Moving is free and your contract end date doesn't change. If you give me your new
  postcode, I'll check what's available there and book the move now. If full fibre isn't available at the new
  address, you can switch to Home 5G instead, or leave without an early termination charge.
+ Happy to help. The easiest way is Moving home in the app, where you enter the new address and your moving date.
  We'll book the connection, send an engineer if needed, and stop the service at your old address on the same day.
  Bring your Hub with you, as it works at the new place too.
- You'll need to cancel and sign up again.
- We can't move broadband, you'll have to pay the cancellation fee.
! Hello {title_surname}, I'm a supervisor. I'm sorry, that was wrong: you don't need to cancel. We'll move your
  broadband to your new home for free, keeping your plan and contract end date. Just add your new address under
  Moving home in the app at least two weeks before, and we'll take care of the rest.

=== broadband | The Wi-Fi doesn't reach my upstairs bedroom. Is there anything I can do?
+ Yes, a few things. First, check the Hub isn't on the floor or inside a cupboard, as raising it to shelf height makes
  a big difference. If it still doesn't reach, a Wi-Fi Boost disc placed halfway between the Hub and the bedroom will
  extend the signal. They're £5 a month with no contract, and I can send one today.
+ Thick walls and floors can block Wi-Fi quite a lot. I can see your Hub is using the 5GHz band, which is faster but
  doesn't travel as far. In the Hub settings at hub.home, turn on Smart Wi-Fi so devices switch to 2.4GHz
  automatically when they're further away. If that's not enough, a Wi-Fi Boost disc will solve it.
+ Sorry about that. Your plan is Fibre 900, which includes one free Wi-Fi Boost disc, and I can see you haven't
  claimed it yet. I've ordered it for you now, and it should arrive in two to three working days. Plug it in on the
  landing upstairs and follow the light on the front to find the best spot.
- Wi-Fi doesn't go through walls well.
- You'd need to upgrade to a faster plan.
! Hi, I'm a team leader. Upgrading your speed won't fix Wi-Fi range, sorry for the confusion. A Wi-Fi Boost disc is
  the best solution for an upstairs room. I've sent one out free for the first three months, and it should arrive
  within three working days.

=== devices | Hi, this is {name}. My new phone arrived with a cracked screen. What do I do?
+ I'm really sorry, {title_surname}. Please don't set the phone up. I've arranged a courier to collect it tomorrow
  between 9am and 5pm, and a replacement will be sent as soon as it's picked up. You won't be charged for the damaged
  phone. Could you take a photo of the damage and the box before the courier arrives, just in case?
+ That's not the start you wanted, sorry. Because you're within 14 days of delivery, we'll replace it. The quickest
  way is to take it to any Northwind store with the box and your order number, and they'll swap it on the spot if
  they have it in stock. Otherwise we can send a courier; just let me know which you'd prefer.
+ Sorry to hear that. I've started a damaged-on-arrival return for your order. You'll get an email with a free
  returns label, and the new phone will go out as soon as the courier scans the parcel. I've also credited a month's
  Flex Pay payment for the inconvenience.
- Is it covered by insurance?
- It might have been damaged after delivery, so you'll need to claim on DeviceCare.
! Hi {title_surname}, I'm a supervisor. I'm sorry, you shouldn't have been told to claim on insurance. A phone that
  arrives damaged is our responsibility. I've arranged a free replacement and a courier to collect the damaged one,
  and you'll get an email confirming the collection slot.

=== devices | How do I unlock my phone so I can use another network's SIM?
+ If you bought your phone from us after December 2021, it's already unlocked, so just pop the other SIM in. For
  older phones, I can request a free unlock code now; it'll arrive by text within two working days with
  instructions. Could you tell me which phone you're using?
+ Good news: I've checked the phone on your account, and it's already unlocked. You can use any network's SIM in it
  straight away. If you see a message saying SIM not supported, restart the phone with the new SIM inside and connect
  to Wi-Fi to finish the setup.
+ I've requested an unlock code for your phone, and you'll get a text within two working days. When it arrives, put
  in the other SIM, switch the phone on and enter the code when asked. There's no charge, and you don't need to have
  finished your contract to unlock it.
- We can't unlock phones until your contract ends.
- Go to a phone shop, they can do it.
! Hello, I'm a team leader. Apologies for the earlier reply, which wasn't right. We'll unlock any phone bought from us
  for free, even during your contract, and phones bought since December 2021 are already unlocked. I've checked
  yours and it's unlocked, so another network's SIM will work straight away.

=== devices | Can I upgrade my phone early? My account email is {email}.
+ Thanks, I've found your account linked to {email}. Yes, you can upgrade now. You have £{balance} left on your Flex
  Pay agreement, which you can either pay off or cover by trading in your current phone. The upgrade screen in the
  app shows the exact amounts and any trade-in offers.
+ You can upgrade whenever you like. I've checked the account for {email}, and your current phone is fully paid off,
  so there's nothing to settle. Tap Upgrade in the My Northwind app to see the latest phones. Orders placed before
  8pm usually arrive the next working day.
+ Yes, and there's a good trade-in offer on at the moment. For your current phone in good condition we'd give around
  £{amount}, which more than covers the £{balance} left on your Flex Pay. I've emailed a personalised quote to
  {email}; it's valid for 14 days.
- You can only upgrade in the last month of your contract.
- Upgrades cost £50.
! Hi, I'm a supervisor. Sorry for the confusion. There's no upgrade fee and no waiting period with Northwind. You can
  upgrade at any time as long as you pay off or trade in to cover the remaining Flex Pay balance, which is
  £{balance}. I've sent the details to {email}.

=== devices | My phone was stolen last night. I need to block the SIM and the phone. I'm {name}, you can reach me on {phone}.
+ I'm so sorry, {title_surname}, that's awful. I've barred your SIM, so no calls or data can be used on your number,
  and I've blocked the handset so it won't work on any UK network. A replacement SIM is on its way and should arrive
  tomorrow. If you have a crime reference number from the police, please send it over for your records.
+ Sorry to hear that. Your SIM is now barred and the phone is blocked. I can see you have DeviceCare, so I've started
  a theft claim, and the claims team will call you on {phone} within 24 hours. Please report it to the police too and
  keep the crime reference number.
+ Done: the SIM and the handset are both blocked as of now. Any charges made after 11pm last night won't be billed to
  you. I've ordered a new SIM to your billing address, and if you'd rather have an eSIM on a spare phone, I can set
  that up instead.
- You'll need to go to a store for that.
- Please call the police.
! Hello {title_surname}, I'm a team leader. I'm sorry you were sent elsewhere; we can do this right now. Your SIM is
  barred and the handset blocked. I'll also call you on {phone} this afternoon to arrange a replacement SIM and check
  whether you'd like to claim on DeviceCare.

=== devices | Does the trade-in offer still apply if my old phone has a small scratch on the back?
+ Yes. Light scratches count as normal wear and are covered by the Good condition price. It only drops if the screen
  is cracked, the phone doesn't switch on or there's liquid damage. When you get your quote in the app, choose Good
  and describe the scratch in the notes, and that price will stand.
+ A small scratch is fine. Our checks only lower the price for cracks, dents or faults, not minor marks. Make sure you
  sign out of iCloud or your Google account and do a factory reset before sending it, as that's the most common
  reason trade-ins are delayed.
+ It should still qualify for the full price. If our technicians decide it's in worse condition than described,
  we'll offer you a new price first, and if you don't accept, we'll send the phone back for free. So there's no risk
  in sending it.
- Not sure, you'll have to see.
- Any damage means we can't accept it.
! Hi, I'm a supervisor. Sorry, that was wrong. Light scratches are normal wear and don't affect the trade-in price;
  only cracks, faults or liquid damage do. And if we ever revise a price, you can choose to have the phone sent back
  for free.

=== esim | Hi, I'm {name}. I got a new iPhone and want to move my eSIM to it. How do I do that?
+ Congratulations on the new phone, {title_surname}! During setup, your new iPhone should offer Transfer from nearby
  iPhone. Keep both phones close, unlocked and on Wi-Fi, and follow the steps. The old phone's eSIM will switch off
  once the new one is active. If you've already finished setup, go to Settings > Mobile Data > Add eSIM.
+ Easy to do. If the quick transfer option doesn't appear, I can send a new eSIM QR code to the email on your
  account. Scan it from Settings > Mobile Data > Add eSIM on the new phone. Your number and plan stay the same, and
  the old eSIM stops working as soon as you scan the new code.
+ No problem. I've generated a new eSIM for you, and you'll get a notification in the My Northwind app on your new
  phone. Tap it to install the eSIM directly, with no QR code needed. Please make sure the new phone is on Wi-Fi. It
  usually takes a couple of minutes.
- You need to order a new SIM card.
- eSIMs can't be moved.
! Hello {title_surname}, I'm a team leader. Apologies, eSIMs can definitely be moved. I've sent a fresh eSIM to the
  email on your account; scan the QR code on the new iPhone and you'll be connected within a few minutes, with the
  same number and plan.

=== esim | The eSIM QR code you emailed to {email} doesn't scan. Can you resend it?
+ Of course. I've sent a new QR code to {email}, and it should arrive within five minutes. Please open it on another
  screen or print it, make sure the phone is on Wi-Fi, and scan it from your phone's settings rather than the camera
  app. Each code can only be used once, so don't delete the eSIM once it's installed.
+ Sorry about that. I can see the first code was already used once, which is why it won't scan again. I've
  cancelled it and sent a fresh one to {email}. If scanning still fails, choose Enter details manually and type the
  activation code printed below the QR code.
+ I've resent it now. If it still won't scan, your phone might not support eSIM, or it might be locked to another
  network. Which phone model do you have? I can check compatibility while you wait for the email.
- The code is fine, it works.
- Please try again later.
! Hi, I'm a supervisor. Sorry for the wait. The earlier code had expired, so I've issued a new one and sent it to
  {email}. Scan it from your phone's settings while on Wi-Fi. I'll keep this chat open for 15 minutes in case you
  have any trouble.

=== esim | Can I have a physical SIM and an eSIM on the same number?
+ Not on the same number, sorry. One number can only be active on one SIM at a time. If you want your number on a
  smartwatch as well, Northwind Duo is the way to do it. Or, if you want two numbers on one phone, you can have a
  physical SIM and an eSIM side by side.
+ Each number can only live on one SIM, physical or eSIM, so activating an eSIM turns off the physical card. That
  said, many phones support a physical SIM and an eSIM with two different numbers, for example for work and personal
  use. Would you like me to look at adding a second line?
+ A number can only be on one SIM at a time, but if you want it on more than one device, Northwind Duo shares your
  number with a smartwatch for £5 a month. For a tablet, a data-only SIM on a separate plan is the usual option.
- Yes, you can have both.
- We don't do eSIM.
! Hello, I'm a team leader. Apologies for the wrong answer earlier. A number can only be active on one SIM at a time,
  so adding an eSIM would switch off your physical SIM. If you want to share your number with a watch, Northwind Duo
  does exactly that.

=== contracts | Hi, my name is {name}. I want to leave Northwind and keep my number. What do I need?
+ Sorry to see you go, {title_surname}. Text PAC to 65075 from your Northwind phone and you'll get your Porting
  Authorisation Code straight back, along with any early termination charges. Give the code to your new provider;
  they'll switch you, usually the next working day, and your Northwind service will end automatically.
+ I can help with that. You'll need a PAC, which I've just sent to your phone by text. It's valid for 30 days. Your
  contract has already ended, so there are no exit fees. Once your new provider moves the number over, your Northwind
  plan closes automatically, and your final bill will follow.
+ No problem. Your PAC has been sent by text. Before you go, I should mention you're still within your minimum term,
  so there's an early termination charge of £{amount}. If price is the reason for leaving, I can offer you Gale
  Unlimited at £18 a month instead. If not, the PAC is all you need.
- You'll need to call the retentions team to cancel.
- Your number stays with us when you leave.
! Hi {title_surname}, I'm a supervisor. I'm sorry, that's not right: you can keep your number. Just text PAC to 65075,
  or I can send it now. Your new provider handles the switch, and your Northwind contract ends automatically.

=== contracts | How much would it cost to cancel my contract early? I'm {name}.
+ Thanks, {title_surname}. You have 7 months left on your 24-month plan. The early termination charge would be
  £{amount}, which is the remaining monthly charges minus VAT and the costs we save. You can also check this any time
  by texting COST to 85075.
+ I've checked your account. Your minimum term ended in March, so you're on a rolling monthly contract and there's no
  charge to leave. You'd just need to give 30 days' notice, or if you're moving to another network, text PAC to 65075
  and your new provider will handle it.
+ The charge today would be £{amount} for your airtime plan. Your phone's Flex Pay balance would also still be due,
  but that's separate and you can keep paying it monthly. If you're leaving because of price, I'm happy to look at
  cheaper options first.
- It depends.
- You'll have to pay the full remaining amount of your contract plus a £100 fee.
! Hello {title_surname}, I'm a team leader. There's no separate exit fee, sorry for the confusion. The early
  termination charge is your remaining monthly charges less VAT and the costs we save, which comes to £{amount}
  today. Text COST to 85075 at any time to check it.

=== contracts | I signed up online three days ago and I've changed my mind. Can I cancel?
+ Yes. You're within the 14-day cooling-off period, so you can cancel without giving a reason. I've started the
  cancellation now. You'll only pay for the days you had the service, and if your order included a phone, you'll get
  a returns label by email; please send it back within 14 days.
+ Of course. As you joined online less than 14 days ago, you can cancel for free. Would you like to keep your number?
  If so, I'll send you a PAC first. Otherwise I'll close the account today and you'll get a final bill for three days'
  usage.
+ Yes, you can. I've cancelled the plan and stopped your Direct Debit, and you'll get a confirmation email shortly.
  You'll only be charged for the three days you've had the service. If you ever want to come back, just let us know.
- You'll need to pay the early termination charge.
- Cancellations have to be done in store.
! Hi, I'm a supervisor. I'm sorry, that was incorrect. You're within your 14-day cooling-off period, so there's no
  early termination charge. I've cancelled your contract today, and you'll only pay for the three days you've had the
  service.

=== contracts | My contract ends next month. Can I get a better deal if I stay?
+ Thanks for checking. Your phone is paid off, so you could move to SIM-only. Based on your usage of around 20GB a
  month, Breeze 30GB at £15 would save you £17 a month compared to now, with the same network and number. I can make
  the change for the date your contract ends.
+ Yes, definitely. As a loyal customer you can get Gale Unlimited for £20 a month on a 12-month SIM-only plan,
  including Roam Zone 1. That's £12 less than you pay today. If you'd prefer a new phone, I can show you upgrade
  options instead.
+ Good timing. If you do nothing, your plan rolls onto a 30-day contract at the same price. But there are better
  options: I've emailed you three personalised deals, and each one would save you at least £8 a month.
- There aren't any deals at the moment.
- Just check the website.
! Hello, I'm a team leader. Sorry for the unhelpful answer. There are certainly better deals for you: because your
  phone is paid off, moving to a SIM-only plan would cut your bill by about half. I've emailed you the options with
  prices.

=== network | There's no signal at all in {town} since this morning. Is there an outage?
+ Thanks for letting us know, and sorry for the trouble. Yes, there's a fault at a mast serving {town} after a power
  cut this morning. Engineers are on site and expect to fix it by 6pm today. In the meantime, Wi-Fi Calling will let
  you make calls if you have Wi-Fi. You can follow updates in the app under Service status.
+ I've checked our network status for {town}, and there's planned maintenance on one of the local masts until 4pm
  today, which explains the lack of signal. Service will come back automatically, though you may need to restart
  your phone afterwards. Sorry we didn't warn you in advance.
+ I can't see any known issues in {town} at the moment, so let's check your phone. Please restart it and check
  Airplane mode is off. If you still have no signal, try your SIM in another phone, or another SIM in yours; that
  tells us whether it's the SIM, the phone or the network. I've also logged your report with our network team.
- There are no outages.
- Coverage can vary.
! Hi, I'm a supervisor. Sorry for the short reply. There is an ongoing fault affecting {town}, which our engineers
  are working on, and we expect service back this evening. I've added a credit to your account for the day's
  disruption.

=== network | My calls keep dropping at home. Wi-Fi Calling is switched on but it doesn't seem to work.
+ Sorry about that. I've checked your account and Wi-Fi Calling is enabled on our side, so it's probably a phone
  setting. Please check your emergency address is filled in under the Wi-Fi Calling settings, as phones won't use it
  without one. Then restart your phone while connected to your home Wi-Fi. You should see Northwind Wi-Fi at the top
  of the screen.
+ Thanks. Your phone model needs a software update to support our Wi-Fi Calling. Please update to the latest version
  in Settings > Software update. Once that's done, restart and look for the Wi-Fi symbol next to the network name. It
  should fix the dropped calls indoors.
+ Some routers block Wi-Fi Calling. If you're not with Northwind Broadband, check your router doesn't block UDP ports
  500 and 4500, and turn off any SIP ALG option. Also try setting your phone to prefer Wi-Fi for calls. If it still
  drops, I can send you a Northwind Signal Box, which boosts indoor signal for free.
- Have you tried turning Wi-Fi Calling off and on again?
- Signal is poor in some homes, there's nothing we can do.
! Hello, I'm a team leader. We can definitely help with this. Your Wi-Fi Calling wasn't set up correctly when you
  changed plans last month. I've fixed that now. Please restart your phone, and it should connect over Wi-Fi within
  a few minutes.

=== network | Can I get 5G on my plan? My phone only ever shows 4G.
+ 5G is included on your Gale Unlimited plan, and your phone supports it too, so it's probably a setting. Go to your
  mobile network settings and choose 5G Auto, or set Preferred network type to 5G. If you're in a 5G area, you'll see
  the 5G icon shortly.
+ Your plan is Breeze 10GB, which is 4G only. Moving to Breeze 30GB adds 5G for £5 more a month, and you'd also get
  20GB more data. I can make the change now without extending your contract, and it would be live within an hour.
+ Your plan includes 5G, but unfortunately your phone model doesn't support it. 4G will still give you good speeds,
  usually 20 to 60Mbps. If you'd like 5G, I can show you upgrade options with a trade-in for your current phone.
- 5G isn't available yet.
- You need to buy a 5G add-on.
! Hi, I'm a supervisor. Apologies: there's no 5G add-on. 5G is included on your plan at no extra cost. Your phone is
  set to 4G only; change it to 5G Auto in your mobile network settings and you'll see 5G wherever it's available.

=== security | I keep getting texts pretending to be from Northwind asking me to update my payment details. Are they real?
+ Thanks for checking with us. Those texts aren't from us. We never ask for payment details by text or email, and our
  texts never include links to log in. Please don't click the link. You can forward the message to 7726 for free,
  which reports it to us and helps us block the sender.
+ No, they're scam messages, and I'm sorry you're getting them. Don't reply or click the link. Forward the text to
  7726 so we can block the sender, then delete it. If you've already entered details, contact your bank straight
  away and let us know so we can add extra security to your account.
+ They're not genuine. A real message from Northwind will only ever ask you to open the My Northwind app, never to
  follow a link. I've turned on our free Scam Shield for your line, which filters most known scam texts before they
  reach you.
- They might be, it's hard to say.
- Yes, we sometimes send those.
! Hello, I'm a team leader. To be clear, those texts are not from Northwind; we'll never ask for payment details by
  text. Please forward them to 7726 and delete them. I've switched on Scam Shield for your number to filter them out.

=== security | Hi, this is {name}. I forgot the password for the My Northwind app and the reset email isn't arriving at {email}.
+ Thanks, {title_surname}. I've checked, and the reset emails are being sent to {email}, so they may be in your spam
  or promotions folder. Look for the subject Reset your Northwind password. Each link is valid for an hour. If you
  can't find it, I can send a reset code by text instead.
+ Sorry about that. I can see the email address on your account has a typo in it, which is why nothing arrives. Once
  I've confirmed it's you with a code sent to your phone, I'll correct it to {email} and resend the reset link.
+ I've just sent a one-time code by text to the number on your account. Enter it on the login screen under Forgot
  password, and you'll be able to set a new password straight away without needing the email.
- Just try again.
- Tell me your old password and I'll reset it for you.
! Hi {title_surname}, I'm a supervisor. We'd never ask for your password, so please don't share it. I've sent a
  one-time code to your phone instead; enter it under Forgot password to choose a new one. I've also checked that
  reset emails to {email} are being delivered.
"""

GREETINGS = [
    "Hi, thanks for contacting Northwind Mobile. How can I help today?",
    "Hello and welcome to Northwind support chat. What can I do for you?",
    "Good morning! You're through to Northwind Mobile. How can I help?",
    "Hi there, thanks for waiting. What can I help you with today?",
    "Welcome to Northwind Mobile chat. What can I help with?",
    "Good afternoon, you're chatting with Northwind Mobile support. How can I help?",
    "Hi! Thanks for getting in touch with Northwind. What's happening?",
    "Hello, thanks for your patience. How can I help you today?",
]
FOLLOWUPS = [  # the customer, after a good reply
    "That worked, thank you!",
    "Perfect, thanks for the quick help.",
    "Brilliant, that's sorted it. Could you email me a summary at {email}?",
    "Great, thanks. If anything else comes up you can reach me on {phone}.",
    "OK, great. Thanks for your help.",
    "Thanks, that makes sense.",
    "Lovely, cheers for that.",
    "Thank you, that's really helpful.",
    "Great. Please send any updates to {email}, I don't always check my texts.",
    "Thanks. My other number is {phone} if you need to call me back.",
]
CLOSINGS = [  # the agent, at the end of a good chat
    "You're welcome, {title_surname}. Is there anything else I can help with today?",
    "Glad I could help! Have a lovely rest of your day.",
    "No problem at all. If anything else comes up, you can reach us any time in the My Northwind app.",
    "Happy to help, {title_surname}. Take care.",
    "I've added a note to your account so whoever you speak to next can see what we've done. Have a good day!",
    "Thank you {title_surname}, enjoy the rest of your day.",
    "Thanks, {title_surname}. I've sent a summary of today's chat to {email}.",
    "You're welcome. Thanks for choosing Northwind, and have a great evening.",
]
PUSHBACKS = [  # the customer, after a poor reply
    "That doesn't really answer my question.",
    "I've already tried that. Is there anything else?",
    "Sorry, but that's not right. Can I speak to someone else, please?",
    "That's not very helpful, to be honest.",
    "Are you sure? That's not what your website says.",
    "Can I talk to a manager, please?",
    "Hmm, that doesn't sound right. Could you double-check?",
]
AFTER_SUPERVISOR = ["Thank you, that's much clearer.", "OK, that's more like it. Thanks.", "Thanks for sorting it out.",
                    "Appreciated, thank you."]
POOR_CLOSINGS = ["I'm afraid that's all the information I have.", "Is there anything else I can help with?",
                 "Sorry, I can't do anything more from here."]

# Destinations by Roam Zone, and what each zone means for the customer (kept consistent with the roaming FAQ).
COUNTRIES = {"Spain": 1, "France": 1, "Italy": 1, "Portugal": 1, "Greece": 1, "Turkey": 1, "Iceland": 1,
             "Canada": 2, "Australia": 2, "Japan": 2, "South Korea": 2, "Thailand": 3, "Mexico": 3, "Egypt": 3,
             "Brazil": 3}
ZONE_ADVICE = {
    1: "On your Gale plan that's included, so you can use your minutes, texts and data as you would at home, up to "
       "25GB of data a month.",
    2: "That isn't included in your plan, so you'll want a Zone 2 Travel Pass at £5 a day, which lets you use your "
       "normal allowance and is only charged on days you use your phone.",
    3: "Your plan doesn't cover Zone 3 on its own, so I'd recommend a Travel Pass at £8 a day. You're only charged on "
       "days you actually use your phone there.",
}
PASS_PRICE = {1: "2", 2: "5", 3: "8"}
TOWNS = ["Harrogate", "Swindon", "Bangor", "Truro", "Kendal", "Stirling", "Margate", "Hexham", "Ludlow", "Whitby"]
ROUTER_URLS = ["hub.local", "routerlogin.net", "the address printed in the old manual", "hub.northwind"]
DAYS = ["1st", "5th", "12th", "18th", "22nd", "28th"]

# Fictional customers. Surnames are chosen so they never occur in the FAQ or articles (checked below).
FIRST_NAMES = {
    "f": ["Maria", "Priya", "Aisha", "Sofia", "Hannah", "Emily", "Fatima", "Ingrid", "Elena", "Chloe", "Yuki", "Niamh",
          "Zara", "Amara", "Leah"],
    "m": ["John", "Tomasz", "Daniel", "Rahul", "Oliver", "Lucas", "Kwame", "Samuel", "James", "Ahmed", "George",
          "Mateo", "Arjun", "Connor", "Felix"],
}
SURNAMES = ["Lopez", "Carter", "Patel", "Nowak", "Bello", "Okafor", "Rossi", "Lindqvist", "Mehta", "Thornton",
            "Hughes", "Haddad", "Moreau", "Larsen", "Mensah", "Whitaker", "Dubois", "Fletcher", "Tanaka", "Karimi",
            "Byrne", "Whitfield", "Kowalski", "Nakamura", "Osei", "Fitzgerald", "Andersson", "Delaney", "Ferreira",
            "Novak"]
FIXED_CUSTOMERS = [("Maria", "Lopez", "f"), ("John", "Carter", "m"), ("Priya", "Patel", "f")]  # the README examples

# Planted PII pools, cycled so every value is used. All are reserved or documented test values: Ofcom's drama
# numbers (07700 900xxx, 020 7946 0xxx), NANP 555-01xx, ACMA's 0491 570 xxx, card-network test PANs, the IBAN
# examples from the ISO 13616 / bank documentation, and RFC 5737 documentation addresses.
PHONES = ["+44 7700 900123", "+1 (202) 555-0143", "020 7946 0958", "+49 30 901820", "(415) 555-2671",
          "07700 900461", "+44 20 7946 0321", "+61 491 570 156", "+1 415 555 0198", "+44 (0)7700 900982"]
CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004", "4012888888881881", "5555 5555 5555 4444",
         "3782 822463 10005", "4242-4242-4242-4242"]
IBANS = ["GB82 WEST 1234 5698 7654 32", "DE89 3704 0044 0532 0130 00", "GB33BUKB20201555555555",
         "FR14 2004 1010 0505 0001 3M02 606", "NL91 ABNA 0417 1643 00", "ES9121000418450200051332"]
IPS = ["203.0.113.42", "198.51.100.23", "192.0.2.146", "203.0.113.7"]
CREDENTIAL_URL = "http://admin:hunter2@192.168.1.1/"
EMAIL_DOMAINS = ["example.com", "example.org", "mail.example.net"]

PII_KIND = {"name": "PERSON", "title_surname": "PERSON", "email": "EMAIL", "phone": "PHONE", "card": "CREDIT_CARD",
            "iban": "IBAN", "ip": "IP_ADDRESS", "router_url": "URL_CREDENTIALS"}

# Hand-written chats that are not in English (language code, topic, csat, turns as (speaker, text)).
NON_ENGLISH_CHATS = [
    ("es", "roaming", 5, [
        ("customer", ("Hola, me llamo Lucía Fernández. Estoy de viaje en Italia y no me funcionan los datos móviles. "
                     "¿Me pueden ayudar?")),
        ("agent", ("Hola, Sra. Fernández, gracias por escribirnos. Italia está en la Roam Zone 1, así que su tarifa "
                  "funciona allí sin coste adicional. Compruebe que la itinerancia de datos está activada en los "
                  "ajustes del teléfono y reinícielo. Yo ya he actualizado su perfil de itinerancia desde aquí.")),
        ("customer", "Ya funciona, ¡muchísimas gracias!"),
    ]),
    ("es", "billing", 4, [
        ("agent", "Hola, gracias por contactar con Northwind Mobile. ¿En qué puedo ayudarle?"),
        ("customer", "Buenas tardes. Me ha llegado una factura de 60 libras y normalmente pago 25. ¿Por qué tanto?"),
        ("agent", ("He revisado su factura: la diferencia corresponde a llamadas a un número de tarificación especial "
                  "el día 12. Si no reconoce esas llamadas, puedo abrir una reclamación ahora mismo.")),
        ("customer", "No las reconozco, por favor ábrala. Mi correo es j.romero@example.org"),
        ("agent", "Hecho. Le enviaremos la respuesta a j.romero@example.org en un plazo de cinco días laborables."),
    ]),
    ("de", "broadband", 5, [
        ("customer", ("Guten Tag, hier ist Jonas Becker. Mein Internet ist seit gestern sehr langsam, obwohl ich "
                     "Fibre 500 habe.")),
        ("agent", ("Guten Tag, Herr Becker. Ich habe Ihre Leitung geprüft: Ihr Hub ist nur mit 100 Mbit/s mit der "
                  "Glasfaserdose verbunden. Bitte tauschen Sie das Netzwerkkabel gegen das graue Kabel aus der "
                  "Verpackung aus und starten Sie den Hub neu.")),
        ("customer", "Danke, jetzt funktioniert alles wieder."),
        ("agent", "Das freut mich. Ich wünsche Ihnen noch einen schönen Tag!"),
    ]),
    ("de", "contracts", 4, [
        ("agent", "Willkommen beim Chat von Northwind Mobile. Wie kann ich Ihnen helfen?"),
        ("customer", ("Hallo, ich ziehe nächsten Monat zurück nach Deutschland. Wie kündige ich meinen Vertrag, und "
                     "fallen Gebühren an?")),
        ("agent", ("Ihre Mindestlaufzeit endet im Mai, danach können Sie mit 30 Tagen Frist ohne Gebühren kündigen. "
                  "Wenn Sie vorher kündigen, fällt eine Gebühr für die restlichen Monate an. Die genaue Summe "
                  "erhalten Sie, wenn Sie COST an 85075 senden.")),
    ]),
    ("fr", "devices", 5, [
        ("customer", ("Bonjour, je m'appelle Camille Laurent. On m'a volé mon téléphone hier soir. Pouvez-vous "
                     "bloquer ma carte SIM ?")),
        ("agent", ("Bonjour Mme Laurent, je suis vraiment désolé. J'ai bloqué votre carte SIM et votre téléphone : "
                  "personne ne pourra plus les utiliser. Une nouvelle carte SIM vous sera envoyée demain.")),
        ("customer", "Merci beaucoup pour votre aide rapide."),
    ]),
    ("fr", "esim", 4, [
        ("agent", "Bonjour et bienvenue sur le chat de Northwind Mobile. Comment puis-je vous aider ?"),
        ("customer", ("Bonjour, le code QR de mon eSIM ne fonctionne pas. Le téléphone dit que le code n'est plus "
                     "valide.")),
        ("agent", ("Chaque code QR ne peut être utilisé qu'une seule fois. Je viens de vous envoyer un nouveau code "
                  "par e-mail. Scannez-le depuis les réglages du téléphone, connecté au Wi-Fi.")),
        ("customer", "Parfait, ça marche maintenant. Merci !"),
    ]),
]
NON_ENGLISH_PII = {"PERSON": ["Lucía Fernández", "Fernández", "Jonas Becker", "Becker", "Camille Laurent", "Laurent"],
                   "EMAIL": ["j.romero@example.org"]}

# Junk and spam: what a chat export really contains next to real conversations (customer turns only).
JUNK_CHATS = [
    ["asdfghjkl qwertyuiop asdf jkl;", "zxcvbnm,./ qwe qwe qweqwe"],
    ["#$%^&*()_+!@#$%^&*()_+ ~~~~ ||||| ;;;;; @@@@@@ ######## !!!!!!"],
    ["test test test", "test"],
    ["http://example.com/promo\nhttps://example.net/offer?id=1\nhttps://example.org/x/y/z\nhttp://example.com/a"],
    [("CONGRATULATIONS!!! You have been selected to WIN a FREE iPhone!!! Click www.free-prize.example.com NOW!!! "
     "Limited time only!!! 🎉🎉🎉")],
]

# Single exchanges: the customer's question, one reply and perhaps a word back. Several customers ask each template's
# question in the same words (only their PII differs, and redaction makes that equal too) and get replies of
# different quality, so the recipe's ratings_to_pairs step finds prompts with both well- and badly-rated answers.
SINGLE_CLOSINGS = {  # the customer's last word after a single reply, matching its quality
    "good": ["Thanks, that's sorted.", "Ok, I'll try that.", "Great, that's exactly what I needed.",
             "Perfect, thank you."],
    "poor": ["That doesn't help at all.", "That's not what I asked.", "Well, that was no use."],
}
SINGLE_GOOD, SINGLE_POOR = 2, 2  # replies of each quality a template's single-asking customers get...
SHORT_HANDED = 16  # ...except in this many templates, which drop one of them (alternately a good and a poor one)

BASE_CHATS = 248  # template chats; with 8 exact copies, 8 near copies, 6 non-English and 5 junk: 275 in all
EXACT_COPIES = 8
NEAR_COPIES = 8
# Similarities are measured on the chat as the recipe's dedup steps see it (see dedup_view), whose MinHash threshold
# is 0.8: a new template chat must stay below ACCEPT_MAX_SIMILARITY with every chat so far, while a planted
# near-duplicate must reach NEAR_MIN_SIMILARITY with its original, high enough above 0.8 that MinHash's estimate
# (standard error about 0.03 with 128 permutations) does not miss it.
ACCEPT_MAX_SIMILARITY = 0.6
NEAR_MIN_SIMILARITY = 0.85
# Small edits for near-duplicates: (pattern, replacement), applied once each to the longest reply. One edit changes
# up to five 5-word shingles, so a chat of 100 words stays about 0.9 similar; two would bring most chats close to 0.8.
NEAR_EDITS = 1
SWAPS = [("usually", "normally"), ("straight away", "right away"), ("check", "confirm"), ("quickest", "fastest"),
         ("about", "around"), ("I've", "I have"), ("phone", "handset"), ("a few", "several"), ("email", "e-mail"),
         ("Happy to help", "Glad to help")]


def parse_templates(source: str) -> list[dict]:
    templates: list[dict] = []
    replies: list[str] = []
    for line in source.strip().splitlines():
        if not line.strip():
            continue
        if line.startswith("=== "):
            topic, _, opener = line[4:].partition("|")
            templates.append({"topic": topic.strip(), "opener": opener.strip(), "zones": (1, 2, 3),
                              "good": [], "poor": [], "supervisor": []})
        elif line.startswith("@ zones:"):
            templates[-1]["zones"] = tuple(int(z) for z in line.split(":")[1].split())
        elif line[:2] in ("+ ", "- ", "! "):
            replies = templates[-1][{"+": "good", "-": "poor", "!": "supervisor"}[line[0]]]
            replies.append(line[2:].strip())
        else:
            replies[-1] += " " + line.strip()
    return templates


def placeholders(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field}


class ChatFill(dict):
    """One chat's placeholder values. PII is drawn only when a reply uses it, so planted.json lists exactly what
    appears; the pools advance only when the chat is kept (see ``ChatFactory.accept``)."""

    def __init__(self, values: dict, draw):
        super().__init__(values)
        self._draw = draw
        self.drawn: set[str] = set()

    def __missing__(self, key: str) -> str:
        value = self[key] = self._draw(key, self)
        self.drawn.add(key)
        return value


class ChatFactory:
    """Builds template chats from a seeded RNG, keeping PII pools and customer names moving across chats."""

    POOLS: ClassVar[dict[str, list[str]]] = {"phone": PHONES, "card": CARDS, "iban": IBANS, "ip": IPS}

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.templates = parse_templates(CHAT_TEMPLATES)
        self.counters = {key: 0 for key in [*self.POOLS, "router_url"]}
        pairs = [(f, s, g) for g, firsts in FIRST_NAMES.items() for f in firsts for s in SURNAMES]
        pairs = [p for p in pairs if p not in FIXED_CUSTOMERS]
        rng.shuffle(pairs)
        self.names = iter(pairs)
        self.fixed = {"my name is {name}": FIXED_CUSTOMERS[0], "this is {name}": FIXED_CUSTOMERS[1],
                      "I'm {name}": FIXED_CUSTOMERS[2]}
        # Single askers of a template all say the same apart from their PII, so its other fields are fixed per template.
        self.variants = {t["opener"]: self.variant(t) for t in self.templates}

    def variant(self, tpl: dict) -> dict:
        """The non-PII fields an opener may name: the destination, the measured speed, the town, the router address."""
        country = self.rng.choice(sorted(c for c, z in COUNTRIES.items() if z in tpl["zones"]))
        return {"country": country, "speed": str(self.rng.choice([35, 40, 48, 60, 72, 85])),
                "town": self.rng.choice(TOWNS), "router_url": self.rng.choice(ROUTER_URLS)}

    def draw(self, key: str, fill: ChatFill) -> str:
        if key in self.POOLS:
            pool = self.POOLS[key]
            return pool[self.counters[key] % len(pool)]
        if key == "router_url":  # the credentials URL is planted exactly once
            n = self.counters[key]
            return CREDENTIAL_URL if n == 0 else ROUTER_URLS[(n - 1) % len(ROUTER_URLS)]
        if key == "email":
            first, last = fill["first"].lower(), fill["surname"].lower()
            number = self.rng.randint(10, 99)
            local = self.rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}.{last}{number}",
                                     f"{last}.{first}", f"{first}{last[0]}"])
            return f"{local}@{self.rng.choice(EMAIL_DOMAINS)}"
        raise KeyError(key)

    def customer(self, tpl: dict) -> tuple[str, str, str]:
        for phrase, person in self.fixed.items():
            if phrase in tpl["opener"]:
                del self.fixed[phrase]
                return person
        return next(self.names)

    def new_fill(self, tpl: dict, person: tuple[str, str, str], single: bool) -> ChatFill:
        rng = self.rng
        first, last, gender = person
        variant = self.variants[tpl["opener"]] if single else self.variant(tpl)
        country = variant["country"]
        zone = COUNTRIES[country]
        values = {"first": first, "surname": last, "name": f"{first} {last}",
                  "title_surname": f"{'Mr.' if gender == 'm' else 'Ms.'} {last}",
                  "country": country, "zone": zone, "zone_advice": ZONE_ADVICE[zone], "pass_price": PASS_PRICE[zone],
                  "amount": f"{rng.randint(12, 95)}.{rng.choice(['00', '40', '50', '75', '99'])}",
                  "balance": str(rng.randint(60, 420)), "speed": variant["speed"], "town": variant["town"],
                  "day": rng.choice(DAYS)}
        if single:  # a longer chat draws its router address from the pool, which plants the credentials URL once
            values["router_url"] = variant["router_url"]
        return ChatFill(values, self.draw)

    def chat(self, tpl: dict, quality: str, idx: int, person: tuple[str, str, str], single: bool) -> dict:
        """One candidate chat with a csat that matches the reply quality, and the PII it contains. A single exchange
        is the opener, one reply and perhaps the customer's last word (2-4 turns); a longer chat always ends with a
        second agent or supervisor reply, so its prompt (everything before the last reply) is its own."""
        rng, fill = self.rng, self.new_fill(tpl, person, single)
        turns: list[dict] = []
        used: set[str] = set()

        def say(speaker: str, text: str) -> None:
            used.update(placeholders(text))
            turns.append({"speaker": speaker, "text": text.format_map(fill)})

        if rng.random() < 0.65:
            say("agent", rng.choice(GREETINGS))
        say("customer", tpl["opener"])
        say("agent", tpl[quality][idx])
        escalated = False
        if single:
            if rng.random() < 0.5:
                say("customer", rng.choice(SINGLE_CLOSINGS[quality]))
            csat = rng.choice([4, 5, 5] if quality == "good" else [1, 1, 2])
        elif quality == "good":
            say("customer", rng.choice(FOLLOWUPS))
            say("agent", rng.choice(CLOSINGS))
            csat = rng.choice([4, 5, 5])
        else:
            say("customer", rng.choice(PUSHBACKS))
            escalated = rng.random() < 0.5
            if escalated:  # the supervisor's reply fixes it, so the chat ends up middling rather than awful
                say("supervisor", tpl["supervisor"][0])
                if len(turns) < 6 and rng.random() < 0.6:
                    say("customer", rng.choice(AFTER_SUPERVISOR))
                csat = rng.choice([2, 3])
            else:
                say("agent", rng.choice(POOR_CLOSINGS))
                csat = rng.choice([1, 1, 2])
        pii: dict[str, list[str]] = {}
        for key in sorted(used & PII_KIND.keys()):
            value = fill["surname"] if key == "title_surname" else fill[key]
            if key == "router_url" and value != CREDENTIAL_URL:
                continue
            pii.setdefault(PII_KIND[key], []).append(value)
        record = {"channel": "chat", "topic": tpl["topic"], "turns": turns, "csat": csat, "escalated": escalated}
        return {"record": record, "pii": pii, "drawn": fill.drawn & set(self.counters)}

    def accept(self, chat: dict) -> None:
        for key in chat["drawn"]:
            self.counters[key] += 1


def chat_text(record: dict) -> str:
    return "\n".join(turn["text"] for turn in record["turns"])


def dedup_view(record: dict, pii: dict[str, list[str]]) -> str:
    """The chat as the recipe's dedup steps see it: leading agent greetings stripped (read_transcripts drops them)
    and planted PII replaced by its placeholder (redact_pii). Two chats that differ only in names and numbers are
    duplicates there, so the similarity checks compare this view rather than the raw text."""
    turns = record["turns"]
    start = next((i for i, t in enumerate(turns) if t["speaker"] == "customer"), len(turns))
    text = "\n".join(t["text"] for t in turns[start:])
    for kind, values in sorted(pii.items(), key=lambda item: item[0] == "PERSON"):  # names last: emails hold them
        for value in sorted(values, key=len, reverse=True):
            text = text.replace(value, f"<{kind}>")
    return text


def single_exchange(record: dict) -> bool:
    """After any greeting: the customer's question, one agent reply and at most the customer's last word."""
    speakers = [t["speaker"] for t in record["turns"]]
    while speakers and speakers[0] == "agent":
        speakers.pop(0)
    return speakers[:2] == ["customer", "agent"] and speakers[2:] in ([], ["customer"])


def chat_plan(rng: random.Random, templates: list[dict]) -> tuple[list[tuple], list[tuple]]:
    """(single exchanges, longer chats) to make, as (template, quality, reply index). Each template's single askers
    get different replies, since two chats with the same prompt and reply would be duplicates after redaction; the
    longer chats use every reply the single ones left out, and both poor ones."""
    singles: list[tuple] = []
    longer: list[tuple] = []
    short = sorted(rng.sample(range(len(templates)), SHORT_HANDED))
    fewer = {n: ("poor", "good")[k % 2] for k, n in enumerate(short)}  # one poor reply less, then one good, ...
    for n, tpl in enumerate(templates):
        counts = {"good": SINGLE_GOOD, "poor": SINGLE_POOR}
        if n in fewer:
            counts[fewer[n]] -= 1
        for quality, count in counts.items():
            picked = rng.sample(range(len(tpl[quality])), count)
            singles += [(tpl, quality, i) for i in picked]
            longer += [(tpl, quality, i) for i in range(len(tpl[quality])) if quality == "poor" or i not in picked]
    rng.shuffle(singles)
    rng.shuffle(longer)
    return singles, longer


def build_template_chats(rng: random.Random) -> list[dict]:
    """The single exchanges, then longer chats (every reply the single ones left out, then extra good chats) up to
    BASE_CHATS; each kept only if it isn't a near-duplicate of one already kept (templates make that easy to do by
    accident). A longer chat that cannot be made distinct is skipped and another one planned instead."""
    factory = ChatFactory(rng)
    singles, longer = chat_plan(rng, factory.templates)
    kept: list[dict] = []
    kept_shingles: list[set] = []

    def make(tpl: dict, quality: str, idx: int, single: bool, attempts: int) -> bool:
        person = factory.customer(tpl)
        for attempt in range(attempts):
            if attempt and attempt % 40 == 0 and quality == "good" and not single:  # this reply is worn out
                idx = rng.randrange(len(tpl["good"]))
            chat = factory.chat(tpl, quality, idx, person, single)
            sh = shingles(dedup_view(chat["record"], chat["pii"]))
            if all(jaccard(sh, other) < ACCEPT_MAX_SIMILARITY for other in kept_shingles):
                factory.accept(chat)
                kept.append(chat)
                kept_shingles.append(sh)
                return True
        return False

    for tpl, quality, idx in singles:
        check(make(tpl, quality, idx, True, 200), f"could not make a distinct single exchange for {tpl['opener']!r}")
    for tpl, quality, idx in longer:
        make(tpl, quality, idx, False, 200)
    skipped = 0
    while len(kept) < BASE_CHATS:
        tpl = rng.choice(factory.templates)
        if not make(tpl, "good", rng.randrange(len(tpl["good"])), False, 40):
            skipped += 1
            check(skipped < 200, f"only {len(kept)} distinct template chats, not {BASE_CHATS}")
    return kept


def near_copy(rng: random.Random, record: dict) -> dict | None:
    """The chat with NEAR_EDITS words swapped in its longest reply, or None if that reply offers too few swaps."""
    turns = [dict(t) for t in record["turns"]]
    longest = max((t for t in turns if t["speaker"] != "customer"), key=lambda t: len(t["text"]))
    options = [(a, b) for a, b in SWAPS if re.search(rf"\b{re.escape(a)}\b", longest["text"])]
    if len(options) < NEAR_EDITS:
        return None
    for a, b in rng.sample(options, NEAR_EDITS):
        longest["text"] = re.sub(rf"\b{re.escape(a)}\b", b, longest["text"], count=1)
    return {**record, "turns": turns}


def build_chats(rng: random.Random) -> tuple[list[dict], dict]:
    """All chat records in file order, and their ground truth (duplicate groups, languages, junk, PII per chat, and
    the single exchanges grouped by their redacted question)."""
    base = build_template_chats(rng)
    order = list(range(len(base)))
    rng.shuffle(order)
    near_pairs = []
    for i in sorted(order, key=lambda i: -len(words(chat_text(base[i]["record"])))):
        if len(near_pairs) == NEAR_COPIES:
            break
        copy = near_copy(rng, base[i]["record"])
        if copy and jaccard(shingles(dedup_view(copy, base[i]["pii"])),
                            shingles(dedup_view(base[i]["record"], base[i]["pii"]))) >= NEAR_MIN_SIMILARITY:
            near_pairs.append((i, {**base[i], "record": copy}))
    check(len(near_pairs) == NEAR_COPIES, f"only {len(near_pairs)} chats could be copied with small edits")
    taken = {i for i, _ in near_pairs}
    exact_pairs = [(i, base[i]) for i in order if i not in taken][:EXACT_COPIES]

    entries = [{"chat": c, "kind": "base", "of": i} for i, c in enumerate(base)]
    entries += [{"chat": c, "kind": "exact", "of": i} for i, c in exact_pairs]
    entries += [{"chat": c, "kind": "near", "of": i} for i, c in near_pairs]
    for lang, topic, csat, turns in NON_ENGLISH_CHATS:
        record = {"channel": "chat", "topic": topic, "turns": [{"speaker": s, "text": t} for s, t in turns],
                  "csat": csat, "escalated": False}
        pii = {kind: [v for v in values if any(v in t["text"] for t in record["turns"])]
               for kind, values in NON_ENGLISH_PII.items()}
        entries.append({"chat": {"record": record, "pii": {k: v for k, v in pii.items() if v}}, "kind": lang})
    for texts in JUNK_CHATS:  # nobody rates a spam chat: csat 3 keeps rating filters from hiding the junk
        record = {"channel": "chat", "topic": "unknown", "turns": [{"speaker": "customer", "text": t} for t in texts],
                  "csat": 3, "escalated": False}
        entries.append({"chat": {"record": record, "pii": {}}, "kind": "junk"})

    rng.shuffle(entries)
    ids = sorted(rng.sample(range(100, 100000), len(entries)))
    for entry, n in zip(entries, ids):
        entry["id"] = f"NW-{n:06d}"
    base_id = {e["of"]: e["id"] for e in entries if e["kind"] == "base"}
    truth = {
        "exact": [sorted([base_id[e["of"]], e["id"]]) for e in entries if e["kind"] == "exact"],  # file order
        "near": [sorted([base_id[e["of"]], e["id"]]) for e in entries if e["kind"] == "near"],
        "non_english": {e["id"]: e["kind"] for e in entries if e["kind"] in ("es", "de", "fr")},
        "junk": [e["id"] for e in entries if e["kind"] == "junk"],
        "pii": {e["id"]: e["chat"]["pii"] for e in entries if e["chat"]["pii"]},
        "single_exchanges": {},
    }
    for e in entries:  # the rated answers ratings_to_pairs groups: single exchanges by their (redacted) question
        if e["kind"] == "base" and single_exchange(e["chat"]["record"]):
            opener = next(t for t in e["chat"]["record"]["turns"] if t["speaker"] == "customer")
            question = dedup_view({"turns": [opener]}, e["chat"]["pii"])
            truth["single_exchanges"].setdefault(question, []).append(e["id"])
    records = [{"conversation_id": e["id"], **e["chat"]["record"]} for e in entries]
    return records, truth


# --------------------------------------------------------------------------------------------------------------------
# Held-out evaluation set (eval/heldout.jsonl). Three items reuse FAQ answers word for word, so decontamination
# has something to find; the rest are new questions answered in the same voice.
# --------------------------------------------------------------------------------------------------------------------

# (eval question, FAQ question whose answer it copies)
CONTAMINATED = [
    ("Do I need to turn on data roaming?", "Do I need to turn on data roaming?"),
    ("Can I take my broadband with me when I move?", "Can I take my broadband with me when I move?"),
    ("How can I keep my number if I leave Northwind?", "How do I leave Northwind and keep my number?"),
]

EVAL_NEW = [
    ("I'm on Breeze 30GB and going to Canada for a week. What's the cheapest way to use my data there?",
     ("Canada is in Roam Zone 2, which Breeze plans don't include. The simplest option is a Zone 2 Travel Pass at £5 "
     "a day: it lets you use your normal minutes, texts and data, and you only pay on days you use your phone. Add it "
     "in the My Northwind app before you fly, and use Wi-Fi Calling on hotel Wi-Fi to save even more.")),
    ("My Fibre 500 connection drops every evening. What should I try before contacting support?",
     ("Switch the Hub off at the wall for half a minute, then see whether devices connected by cable lose the "
     "connection too. If only Wi-Fi drops, raise the Hub off the floor, keep it clear of other electronics or add a "
     "Wi-Fi Boost disc. If wired devices drop as well, report a fault in the app so we can test your line.")),
    ("Will moving to an eSIM give me a new phone number?",
     ("No. Moving to an eSIM keeps your number, your plan and your contract as they are; only the way the SIM is "
     "stored in your phone changes. Your plastic SIM stops working when the eSIM goes live, and making the switch in "
     "the My Northwind app costs nothing.")),
    ("I lost my phone while on holiday. What should I do first?",
     ("Get in touch as soon as you can so we can bar your SIM and nobody can use your number. You can use the My "
      "Northwind app on a friend's phone or a laptop, or ring 150 free from a Northwind mobile. We can block the "
      "handset as well. If you have DeviceCare, we'll start a claim at the same time, and if the phone was stolen, "
      "report it to the local police.")),
    ("Does Wi-Fi Calling cost extra?",
     ("No. Wi-Fi Calling is free and uses your normal plan minutes and texts. Even when you're abroad, a call or text "
     "to a UK number sent over Wi-Fi is billed as though you were at home, so you don't need a Travel Pass for it.")),
    ("How much will my mobile plan go up by in April?",
     ("Mobile airtime plans rise by a fixed £1.50 a month each April, as set out in your contract summary, and "
     "broadband plans rise by £3 a month. What you pay for your phone on Flex Pay stays the same.")),
    ("Can I use a phone I bought elsewhere with a Northwind SIM-only plan?",
     ("Yes, as long as the phone is unlocked. Any unlocked phone that works on UK 4G networks will work with our "
     "SIM-only plans, and you'll need a 5G phone to use 5G. If your phone supports eSIM, you can choose an eSIM "
     "instead of a plastic SIM when you order.")),
    ("I got a text saying my Northwind payment failed, with a link to update my card. Is it genuine?",
     ("Treat it as a scam. Northwind never asks you to enter payment details through a link in a text. Don't tap the "
     "link; forward the message to 7726 and then delete it. To check your account, open the My Northwind app "
     "directly instead.")),
    ("What's the difference between Fibre 150 and Home 5G?",
     ("Fibre 150 runs over a full fibre cable to your home and gives a steady average of 150Mbps, but it may need an "
     "engineer visit and comes with an 18- or 24-month term. Home 5G uses our mobile network, averages around 120Mbps "
     "depending on signal, plugs in without an engineer and is also available on a 30-day rolling plan.")),
    ("My PAC code has expired. Can I get a new one?",
     ("Yes. Each PAC lasts 30 days, and you can ask for a new one as often as you need. Send another text with the "
     "word PAC to 65075 and a fresh code will come back within a minute.")),
    ("How can I stop my child buying apps on my bill?",
     ("Turn off third-party purchases for their line in the My Northwind app, or set their Spend Cap to £0 so that "
     "extras outside the plan are blocked. Both are free, as are a content lock and a roaming bar, and changes "
     "apply within the hour.")),
    ("My phone shows 5G but the internet feels slow. Why?",
     ("The 5G icon only means you're connected to 5G, not that the signal is strong. Indoors or at the edge of a "
     "cell, speeds can fall below what good 4G would give. Try moving nearer a window, and check you haven't used up "
     "your monthly data. If it's slow in the same place every day, report it so our network team can look at "
     "coverage there.")),
]
EVAL_CONTAMINATED_POSITIONS = (1, 6, 11)


def build_eval(faq_pairs: list[tuple[str, str, str]]) -> list[dict]:
    answer_of = {q: a for _, q, a in faq_pairs}
    items = [{"question": q, "answer": a} for q, a in EVAL_NEW]
    for pos, (question, faq_question) in zip(EVAL_CONTAMINATED_POSITIONS, CONTAMINATED):
        items.insert(pos, {"question": question, "answer": answer_of[faq_question]})
    return items


# --------------------------------------------------------------------------------------------------------------------
# Ground truth and checks
# --------------------------------------------------------------------------------------------------------------------


def build_planted(faq_pairs, chat_truth) -> dict:
    pii: dict[str, list[str]] = {kind: [] for kind in
                                 ["EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "URL_CREDENTIALS", "PERSON"]}
    for found in chat_truth["pii"].values():
        for kind, values in found.items():
            pii[kind] += [v for v in values if v not in pii[kind]]
    faq = "raw/faq/"
    docs = "raw/docs/"
    return {
        "pii": pii,
        "pii_by_conversation": chat_truth["pii"],
        "exact_duplicates": [[faq + FAQ_MIRROR[0], faq + FAQ_MIRROR[1]],
                             [docs + DOC_DUPLICATE[0], docs + DOC_DUPLICATE[1]], *chat_truth["exact"]],
        "near_duplicates": [[f"{faq}{a}::{q}", f"{faq}{b}::{q}"] for a, b, q in FAQ_NEAR_DUPLICATES]
        + chat_truth["near"],
        "non_english": [*chat_truth["non_english"], *(docs + d for d in DOC_NON_ENGLISH)],
        "languages": {**chat_truth["non_english"], **{docs + d: lang for d, lang in DOC_NON_ENGLISH.items()}},
        "junk": [*chat_truth["junk"], *(docs + d for d in DOC_JUNK)],
        "contaminated_faq_questions": [faq_q for _, faq_q in CONTAMINATED],
        "single_exchanges": chat_truth["single_exchanges"],
        "faq_pairs_per_file": {faq + page: sum(p == page for p, _, _ in faq_pairs)
                               for page in dict.fromkeys(p for p, _, _ in faq_pairs)},
        "boilerplate_docs": [docs + d for d in DOC_BOILERPLATE],
        "encodings": {docs + DOC_CP1252: "cp1252"},
        "crlf_files": [docs + DOC_CRLF],
        "notes": (
            "Ids are conversation_id values or paths relative to samples/telecom; 'path::question' names one FAQ "
            "pair. Chat groups list ids in file order; file groups list the original first. PERSON lists full names "
            "and the surnames used in forms like 'Mr. Carter'. The IP inside URL_CREDENTIALS (192.168.1.1) is not "
            "listed under IP_ADDRESS. single_exchanges groups the chats that are one question and one reply (plus "
            "any greeting and the customer's last word) by the question with its PII replaced by placeholders: each "
            "group holds replies rated 4-5 and 1-2, the material ratings_to_pairs makes preference pairs from."
        ),
    }


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"make_corpus check failed: {message}")


def check_faq(faq_pairs) -> None:
    for page in {p for p, _, _ in faq_pairs}:
        n = sum(p == page for p, _, _ in faq_pairs)
        check(12 <= n <= 15, f"{page} has {n} Q/A pairs")
    for page, q, a in faq_pairs:
        check(q.endswith("?"), f"{page}: question without '?': {q}")
        check(40 <= len(a.split()) <= 120, f"{page}: answer to {q!r} has {len(a.split())} words")
    answers = {(p, q): a for p, q, a in faq_pairs}
    for a, b, q in FAQ_NEAR_DUPLICATES:
        left, right = answers[(a, q)].split(), answers[(b, q)].split()
        changed = sum(x != y for x, y in zip(left, right)) + abs(len(left) - len(right))
        check(1 <= changed <= 3, f"near-duplicate FAQ pair {q!r} differs by {changed} words")


def check_docs(doc_files: dict[str, bytes]) -> None:
    long_docs = 0
    for name, data in doc_files.items():
        if name == DOC_CP1252:
            try:
                data.decode("utf-8")
                check(False, f"{name} should not be valid UTF-8")
            except UnicodeDecodeError:
                pass
            text = data.decode("cp1252")
        else:
            text = data.decode("utf-8")
        long_docs += len(text) > 3000
        if name not in DOC_JUNK:
            check(300 <= len(text.split()) <= 1500, f"{name} has {len(text.split())} words")
    check(long_docs >= 5, f"only {long_docs} articles over 3000 characters")


def check_chats(records: list[dict], truth: dict) -> dict:
    """Planted duplicates are the only duplicates, as the recipe's dedup steps see the chats, and the single exchanges
    keep their promise; returns figures for the report."""
    by_id = {r["conversation_id"]: r for r in records}
    for r in records:
        if r["topic"] != "unknown":
            check(2 <= len(r["turns"]) <= 6, f"{r['conversation_id']} has {len(r['turns'])} turns")
        check(r["csat"] in range(1, 6), f"{r['conversation_id']} csat {r['csat']}")
    sh = {cid: shingles(dedup_view(r, truth["pii"].get(cid, {}))) for cid, r in by_id.items()}
    exact = {frozenset(g) for g in truth["exact"]}
    near = {frozenset(g) for g in truth["near"]}
    worst = 0.0
    ids = sorted(by_id)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            pair = frozenset((a, b))
            same = by_id[a]["turns"] == by_id[b]["turns"]
            check(same == (pair in exact), f"{a} and {b}: identical={same}, planted={pair in exact}")
            if pair in exact:
                continue
            sim = jaccard(sh[a], sh[b])
            if pair in near:
                check(sim >= NEAR_MIN_SIMILARITY, f"planted near-duplicates {a}, {b} only {sim:.2f} similar")
            else:
                worst = max(worst, sim)
    check(worst < 0.7, f"unplanted chats are {worst:.2f} similar")
    near_sims = [jaccard(sh[a], sh[b]) for a, b in truth["near"]]

    english = [r for r in records if r["topic"] != "unknown" and r["conversation_id"] not in truth["non_english"]]
    single = sum(single_exchange(r) for r in english)
    check(0.4 <= single / len(english) <= 0.5, f"{single} of {len(english)} English chats are single exchanges")
    groups = truth["single_exchanges"]
    check(len(groups) == len(parse_templates(CHAT_TEMPLATES)), f"single exchanges ask {len(groups)} questions")
    for question, members in groups.items():
        scores = sorted(by_id[cid]["csat"] for cid in members)
        check(len(members) >= 3 and scores[0] <= 2 and scores[-1] >= 4,
              f"{question!r} is asked by {len(members)} single exchanges rated {scores}")
    return {"max_unplanted": worst, "near_min": min(near_sims), "near_max": max(near_sims), "single": single,
            "english": len(english), "questions": len(groups)}


def check_eval(items: list[dict], faq_files: dict[str, str], faq_pairs, other_text: str) -> None:
    faq_text = "\n".join(faq_files.values())
    faq_grams = set().union(*(shingles(a, 8) for _, _, a in faq_pairs))
    other_grams = shingles(other_text, 13)
    contaminated = {answer for _, _, answer in faq_pairs if answer in {i["answer"] for i in items}}
    check(len(contaminated) == len(CONTAMINATED), "contaminated eval answers not found among FAQ answers")
    for item in items:
        if item["answer"] in contaminated:
            check(item["answer"] in faq_text, "a contaminated answer is not verbatim in the FAQ files")
            continue
        # The usual decontamination overlaps: 8-grams against the FAQ, 13-grams (GPT-3's choice) against the rest.
        text = item["question"] + "\n" + item["answer"]
        check(not shingles(text, 8) & faq_grams, f"eval item overlaps the FAQ: {item['question']!r}")
        check(not shingles(text, 13) & other_grams, f"eval item overlaps docs or chats: {item['question']!r}")


def check_planted(planted: dict, texts: dict[str, str]) -> None:
    """Every string in planted.json is a file we wrote or appears verbatim in one (the promise tests rely on)."""
    chats = texts["raw/chats/transcripts.jsonl"]
    everything = "\n".join(texts.values())

    def present(item: str) -> bool:
        if "::" in item:
            path, question = item.split("::", 1)
            return question in texts.get(path, "")
        return item in texts or item in everything

    for kind, values in planted["pii"].items():
        check(bool(values), f"no {kind} planted")
        for value in values:
            check(value in chats, f"planted {kind} {value!r} is not in the chats")
    for key in ["exact_duplicates", "near_duplicates"]:
        for group in planted[key]:
            for item in group:
                check(present(item), f"{key}: {item!r} not found")
    for key in ["non_english", "junk", "contaminated_faq_questions"]:
        for item in planted[key]:
            check(present(item), f"{key}: {item!r} not found")
    for card in planted["pii"]["CREDIT_CARD"]:
        check(luhn_ok(card), f"{card} fails the Luhn check")
    for iban in planted["pii"]["IBAN"]:
        check(iban_ok(iban), f"{iban} fails the mod-97 check")
    for pool, kind in [(PHONES, "PHONE"), (CARDS, "CREDIT_CARD"), (IBANS, "IBAN"), (IPS, "IP_ADDRESS")]:
        missing = set(pool) - set(planted["pii"][kind])
        check(not missing, f"{kind} values never used: {sorted(missing)}")
    for domain in EMAIL_DOMAINS:
        check(any(e.endswith("@" + domain) for e in planted["pii"]["EMAIL"]), f"no email at {domain}")
    check(planted["pii"]["URL_CREDENTIALS"] == [CREDENTIAL_URL], "the credentials URL must appear exactly once")
    holders = [cid for cid, found in planted["pii_by_conversation"].items() if "URL_CREDENTIALS" in found]
    check(chats.count(CREDENTIAL_URL) == len(holders), "the credentials URL is in a chat planted.json doesn't name")
    # The FAQ pages and articles carry no personal data, so every PII hit there is a false positive.
    public = "\n".join(t for path, t in texts.items() if not path.startswith("raw/chats"))
    for value in planted["pii"]["PERSON"] + planted["pii"]["EMAIL"]:
        check(not re.search(rf"\b{re.escape(value)}\b", public), f"{value!r} appears outside the chats")


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    rng = random.Random(SEED)
    faq_files, faq_pairs = build_faq()
    doc_files = build_docs()
    chats, chat_truth = build_chats(rng)
    planted = build_planted(faq_pairs, chat_truth)

    outputs: dict[str, bytes] = {f"raw/faq/{name}": text.encode("utf-8") for name, text in faq_files.items()}
    outputs.update({f"raw/docs/{name}": data for name, data in doc_files.items()})
    outputs["raw/chats/transcripts.jsonl"] = jsonl(chats).encode("utf-8")
    texts = {path: data.decode("cp1252" if path.endswith(DOC_CP1252) else "utf-8") for path, data in outputs.items()}
    eval_items = build_eval(faq_pairs)
    outputs["eval/heldout.jsonl"] = jsonl(eval_items).encode("utf-8")
    outputs["planted.json"] = (json.dumps(planted, ensure_ascii=False, indent=2) + "\n").encode("utf-8")

    check_faq(faq_pairs)
    check_docs(doc_files)
    similarity = check_chats(chats, chat_truth)
    other = "\n".join(t for p, t in texts.items() if not p.startswith("raw/faq"))
    check_eval(eval_items, faq_files, faq_pairs, other)
    check_planted(planted, texts)
    total = sum(len(d) for d in outputs.values())
    check(total < 2_000_000, f"the sample is {total} bytes")

    for path, data in outputs.items():
        target = HERE / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    stale = sorted(str(p.relative_to(HERE)) for d in ("raw", "eval") for p in (HERE / d).rglob("*")
                   if p.is_file() and str(p.relative_to(HERE)) not in outputs)
    check(not stale, f"files not written by this script: {stale}")

    counts = {"faq files": len(faq_files), "faq pairs": len(faq_pairs), "docs": len(doc_files), "chats": len(chats),
              "eval items": len(eval_items), "bytes": total}
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    print("chat similarity (5-word shingle Jaccard): unplanted max {max_unplanted:.2f}, planted near-duplicates "
          "{near_min:.2f}-{near_max:.2f}".format(**similarity))
    turn_counts = sorted(Counter(len(c["turns"]) for c in chats).items())
    print("chats by turns:", ", ".join(f"{n}: {k}" for n, k in turn_counts))
    print("single exchanges: {single} of {english} English chats, asking {questions} questions".format(**similarity))
    print("PII planted:", ", ".join(f"{k} {len(v)}" for k, v in planted["pii"].items()))


if __name__ == "__main__":
    main()
